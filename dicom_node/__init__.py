"""The STARDUST DICOM node: receive, store, assemble cases, rules, jobs, send, watch folder."""

__version__ = "0.1.0"
