"""Sub-commands of ``dicom-node`` (see :mod:`dicom_node.cli`)."""
