"""Routing rules: which engine, model and destinations a case gets (``config/rules.yaml``).

A rules file is an ordered list of rules; the **first matching rule wins**. A rule's
``match`` holds conditions that must *all* hold (a missing condition matches anything);
its ``action`` says how to segment and where the result goes. When no rule matches, the
case is not processed and :class:`Decision` says why, rule by rule (the default file ends
with a catch-all rule so that, out of the box, every prompt case is processed).

File format (see ``config/rules.yaml`` for the documented default)::

    version: 1
    defaults:                 # optional: action fields shared by every rule
      destinations: [tps]
    rules:
      - name: mr-sarcoma
        match:
          modality: MR                      # one value or a list, exact (case-insensitive)
          calling_aet: ["RAYSTATION.*"]     # regexes, full match, any of them
          called_aet: STARDUST
          roi_names: ["(?i)gtv.*"]          # any ROI of the RTSTRUCT full-matches any pattern
          prompt_roi_names: ["BOX_.*"]      # same, only the prompt ROIs (BOX_/POS_/NEG_)
          image_tags:                       # every entry must match (regex, full match)
            BodyPartExamined: "(?i)leg|thigh"
            "(0008,103E)": "(?i).*t1.*"
          rtstruct_tags:
            StructureSetLabel: "AI.*"
        action:
          engine: sam2
          mode: video3d
          checkpoint: /opt/stardust/models/medsam2.pt
          model_cfg: configs/sam2.1/sam2.1_hiera_t512.yaml
          window: null
          output_roi_name: "{target}_AI"
          output_color: [255, 0, 0]
          destinations: [tps, archive]

The node's worker builds a :class:`RuleContext` per case (or :meth:`RuleContext.from_files`),
calls :meth:`RuleSet.evaluate` and uses ``decision.action`` (``None``: do not process;
``decision.explanation`` says why).

The package's parts: :mod:`.conditions` (what a rule matches on: :class:`Match` and its tag
conditions), :mod:`.action` (what a rule does: :class:`Action`), :mod:`.context` (what a
rule can see of a case: :class:`RuleContext`), :mod:`.ruleset` (the file, its validation
and the first-match evaluation: :class:`RuleSet`, :class:`Rule`, :class:`Decision`).
"""

from dicom_node.rules.action import Action
from dicom_node.rules.conditions import Match, RulesError, TagCondition
from dicom_node.rules.context import RuleContext, prompt_rois_of
from dicom_node.rules.ruleset import Decision, Rule, RuleSet

__all__ = [
    "Action",
    "Decision",
    "Match",
    "Rule",
    "RuleContext",
    "RuleSet",
    "RulesError",
    "TagCondition",
    "prompt_rois_of",
]
