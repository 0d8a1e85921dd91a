"""``dicom-node phantom OUTDIR``: a synthetic CT/MR series with a tumour, its prompt and truth."""

from __future__ import annotations


def register(sub) -> None:
    p = sub.add_parser("phantom", help="write a synthetic series, prompt.dcm and truth.dcm")
    p.add_argument("outdir")
    p.add_argument("--modality", choices=["CT", "MR"], default="CT")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=run)


def run(args) -> int:
    raise NotImplementedError("phantom generator: foundation work in progress")
