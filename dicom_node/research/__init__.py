"""Research tools for validating the node on a department's own archive.

* :mod:`.cases`    - walk a folder of DICOM files (headers only) into cases: one image
  series with the RTSTRUCT(s) on its frame of reference; or NPZ files written by convert.
* :mod:`.convert`  - ``dicom-node convert``: cases to one NPZ per case (images, label map,
  geometry), optionally pseudonymised.
* :mod:`.simulate` - the planner's prompt simulated from a ground-truth mask (box or points),
  seeded.
* :mod:`.study`    - ``dicom-node study``: simulate, segment through the node's pipeline,
  score (Dice, surface Dice, HD95, volume ratio, slices reached, seconds).
* :mod:`.finetune` - ``dicom-node finetune``: train LiteMedSAM or SAM2 on convert's NPZ,
  split by patient, validate through the node's pipeline, write checkpoints rules load.
* :mod:`.report`   - summary tables (median and IQR per dataset and model) and PNG figures.

Nothing here is used by the node itself; heavy imports (matplotlib, torch) stay inside
functions so that ``dicom-node --help`` starts fast.
"""
