"""The rules file: :class:`Rule`, :class:`RuleSet` (loading with errors that name the rule and
key, first-match evaluation with one explanation line per rule, consistency checks against
the node configuration) and the outcome, :class:`Decision`."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from dicom_node.rules.action import Action
from dicom_node.rules.conditions import Match, RulesError
from dicom_node.rules.context import RuleContext
from dicom_node.yamlfile import read_yaml


class Rule(BaseModel):
    """One rule: a name, conditions and an action. ``enabled: false`` skips it."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str = Field(min_length=1)
    description: str = ""
    enabled: bool = True
    match: Match = Field(default_factory=Match)
    action: Action


@dataclass
class Decision:
    """The outcome of :meth:`RuleSet.evaluate`.

    ``rule``/``action`` are ``None`` when no rule matched (the case is not processed).
    ``explanation`` has one line per rule, in order: matched, or which conditions failed.
    """

    rule: Rule | None
    action: Action | None
    explanation: list[str] = field(default_factory=list)

    @property
    def matched(self) -> bool:
        return self.rule is not None

    @property
    def reason(self) -> str:
        if self.rule is None:
            return "no rule matched: the case is not processed"
        return f"rule {self.rule.name!r} fired"


class RuleSet:
    """An ordered list of rules, loaded and validated from YAML."""

    def __init__(self, rules: list[Rule], source: Path | None = None) -> None:
        names = [r.name for r in rules]
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise RulesError(f"{source or 'rules'}: rule names must be unique; repeated: {', '.join(dupes)}")
        self.rules = list(rules)
        self.source = source

    def __len__(self) -> int:
        return len(self.rules)

    def __iter__(self):
        return iter(self.rules)

    @classmethod
    def load(cls, path: str | Path) -> RuleSet:
        """Read and validate a rules file; :class:`RulesError` names the rule and key."""
        path = Path(path)
        data = read_yaml(path, "rules file", RulesError)
        return cls.from_data(data, source=path, base_dir=path.parent)

    @classmethod
    def from_data(cls, data: Any, source: Path | str | None = None, base_dir: Path | None = None) -> RuleSet:
        """Validate already-parsed YAML (a mapping with ``rules``, or a bare list)."""
        where = str(source or "rules")
        if isinstance(data, list):
            data = {"rules": data}
        if not isinstance(data, dict):
            raise RulesError(f"{where}: expected a mapping with a 'rules' list (got {type(data).__name__})")
        unknown = set(data) - {"version", "defaults", "rules"}
        if unknown:
            raise RulesError(
                f"{where}: unknown top-level key(s) {', '.join(sorted(map(str, unknown)))} "
                "(allowed: version, defaults, rules)"
            )
        version = data.get("version", 1)
        if version != 1:
            raise RulesError(f"{where}: version: this node reads rules version 1, not {version!r}")
        defaults = data.get("defaults") or {}
        if not isinstance(defaults, dict):
            raise RulesError(f"{where}: defaults: expected a mapping of action fields")
        bad_defaults = set(defaults) - set(Action.model_fields)
        if bad_defaults:
            raise RulesError(
                f"{where}: defaults: unknown action field(s) {', '.join(sorted(map(str, bad_defaults)))} "
                f"(known: {', '.join(Action.model_fields)})"
            )
        raw_rules = data.get("rules")
        if not isinstance(raw_rules, list) or not raw_rules:
            raise RulesError(f"{where}: 'rules' must be a non-empty list of rules")

        rules: list[Rule] = []
        for index, raw in enumerate(raw_rules, start=1):
            label = f"rule #{index}"
            if isinstance(raw, dict) and isinstance(raw.get("name"), str):
                label = f"rule #{index} {raw['name']!r}"
            if not isinstance(raw, dict):
                raise RulesError(f"{where}: {label}: expected a mapping with name, match and action")
            raw = dict(raw)
            action = raw.get("action")
            if action is None:
                raise RulesError(
                    f"{where}: {label}: action: missing (say at least which engine, e.g. 'engine: classic')"
                )
            if not isinstance(action, dict):
                raise RulesError(f"{where}: {label}: action: expected a mapping of action fields")
            action = {**defaults, **action}
            for key in ("checkpoint", "export_folder"):
                if base_dir is not None and isinstance(action.get(key), str):
                    p = Path(action[key]).expanduser()
                    action[key] = str(p if p.is_absolute() else (base_dir / p))
            raw["action"] = action
            if raw.get("match") is None:
                raw.pop("match", None)
            try:
                rules.append(Rule.model_validate(raw))
            except ValidationError as exc:
                raise RulesError(f"{where}: {label}: {_format_errors(exc)}") from None
        return cls(rules, source=Path(source) if source else None)

    # -- evaluation -------------------------------------------------------------------
    def evaluate(self, ctx: RuleContext) -> Decision:
        """The first enabled rule whose conditions all hold, with an explanation per rule."""
        explanation: list[str] = []
        winner: Rule | None = None
        for index, rule in enumerate(self.rules, start=1):
            head = f"rule {index} {rule.name!r}"
            if winner is not None:
                explanation.append(f"{head}: not evaluated (rule {winner.name!r} fired first)")
                continue
            if not rule.enabled:
                explanation.append(f"{head}: disabled")
                continue
            held, failed = rule.match.check(ctx)
            if failed:
                explanation.append(f"{head}: no match: " + "; ".join(failed))
            else:
                why = "; ".join(held) if held else "catch-all (no conditions)"
                explanation.append(f"{head}: MATCH: {why}")
                winner = rule
        if winner is None:
            explanation.append("no rule matched: the case is not processed")
        return Decision(rule=winner, action=winner.action if winner else None, explanation=explanation)

    # -- consistency with the node configuration --------------------------------------
    def check_destinations(self, known: set[str]) -> list[str]:
        """Problems: destinations named by rules that the node configuration does not define."""
        problems = []
        for rule in self.rules:
            for name in rule.action.destinations:
                if name not in known:
                    have = ", ".join(sorted(known)) or "none defined"
                    problems.append(
                        f"rule {rule.name!r}: destination {name!r} is not defined in the node "
                        f"configuration (defined: {have})"
                    )
            if rule.enabled and not rule.action.destinations and rule.action.export_folder is None:
                problems.append(f"rule {rule.name!r}: no destinations and no export_folder: results would go nowhere")
        return problems

    def check_files(self) -> list[str]:
        """Problems: model checkpoints of enabled rules that are not readable files."""
        problems = []
        for rule in self.rules:
            ckpt = rule.action.checkpoint
            if rule.enabled and ckpt is not None and not ckpt.is_file():
                problems.append(f"rule {rule.name!r}: checkpoint {ckpt} is not a file")
        return problems


def _format_errors(exc: ValidationError) -> str:
    parts = []
    for err in exc.errors():
        loc = ".".join(str(p) for p in err["loc"] if not isinstance(p, int) or len(err["loc"]) == 1)
        msg = err["msg"]
        if msg.startswith("Value error, "):
            msg = msg[len("Value error, ") :]
        if err["type"] == "extra_forbidden":
            msg = "unknown key"
            parent = err["loc"][0] if err["loc"] else None
            model = {"match": Match, "action": Action}.get(parent, Rule)
            msg += f" (known: {', '.join(model.model_fields)})"
        elif err["type"] == "missing":
            msg = "missing"
        parts.append(f"{loc}: {msg}" if loc else msg)
    return "; ".join(parts)
