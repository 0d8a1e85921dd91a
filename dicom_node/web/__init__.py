"""The operator's view: the web page and ``/metrics`` served by the node (``web:`` in node.yaml).

:mod:`dicom_node.web.app` is the Starlette application, :mod:`dicom_node.web.views` reads
what the pages show, :mod:`dicom_node.web.auth` says who is asking, and
:mod:`dicom_node.web.server` runs it with uvicorn inside the receiving process.
"""
