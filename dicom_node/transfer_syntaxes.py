"""The transfer syntaxes the node accepts: what a PACS or TPS may send, and what decodes here.

The store keeps every instance exactly as it was received (:mod:`dicom_node.store`); the
pixels are decoded only when a case is loaded (:func:`rtstruct.series.load_series`), by
pydicom's pixel-data plugins. A syntax is therefore offered at association negotiation
only when pydicom has a decoder for it *in this installation*: a peer whose syntax is not
offered falls back to another one it proposed (every sender proposes an uncompressed
one as well; dcmtk's storescu decompresses on the fly) or fails for that SOP class, and
nothing is stored that the worker could not read.

Which plugin decodes what (pydicom 3 tries the available plugins of a syntax in turn):

====================================  =============================  ======================================
syntax                                UID                            plugins (package)
====================================  =============================  ======================================
Implicit / Explicit VR Little Endian  1.2.840.10008.1.2, .1.2.1      pydicom itself
Deflated Explicit VR Little Endian    1.2.840.10008.1.2.1.99         pydicom itself (zlib)
Explicit VR Big Endian (retired)      1.2.840.10008.1.2.2            pydicom itself
JPEG Baseline (8-bit, lossy)          1.2.840.10008.1.2.4.50         pylibjpeg-libjpeg, pillow
JPEG Extended (12-bit, lossy)         1.2.840.10008.1.2.4.51         pylibjpeg-libjpeg (pillow: 8-bit only)
JPEG Lossless (process 14)            1.2.840.10008.1.2.4.57         pylibjpeg-libjpeg
JPEG Lossless SV1                     1.2.840.10008.1.2.4.70         pylibjpeg-libjpeg
JPEG-LS Lossless                      1.2.840.10008.1.2.4.80         pyjpegls, pylibjpeg-libjpeg
JPEG-LS Near-Lossless                 1.2.840.10008.1.2.4.81         pyjpegls, pylibjpeg-libjpeg
JPEG 2000 Lossless                    1.2.840.10008.1.2.4.90         pylibjpeg-openjpeg, pillow
JPEG 2000 (lossy or lossless)         1.2.840.10008.1.2.4.91         pylibjpeg-openjpeg, pillow
HTJ2K Lossless, RPCL Lossless         1.2.840.10008.1.2.4.201, .202  pylibjpeg-openjpeg
HTJ2K (lossy or lossless)             1.2.840.10008.1.2.4.203        pylibjpeg-openjpeg
RLE Lossless                          1.2.840.10008.1.2.5            pylibjpeg-rle, pydicom (numpy)
====================================  =============================  ======================================

(pylibjpeg-libjpeg and pylibjpeg-openjpeg are reached through ``pylibjpeg``; gdcm, which
pydicom can also use, is not installed.) HTJ2K is accepted because pylibjpeg-openjpeg's
OpenJPEG (2.5) decodes High-Throughput codestreams; the tests decode codestreams made by
OpenJPH's encoder.

Not accepted (:func:`refusal` says why, in one sentence): JPEG 2000 Part 2 multi-component
(.92/.93), Encapsulated Uncompressed (1.2.840.10008.1.2.1.98) and the retired JPEG processes
have no pydicom decoder; JPIP referenced syntaxes (.94/.95/.204/.205) leave the pixels on a
JPIP server; MPEG-2, MPEG-4/H.264 and HEVC are video, never a CT or MR slice stack; JPEG XL
(.110-.112) is not known to pydicom 3.0. A candidate whose plugin is missing in an
installation is left out there (:func:`unavailable` lists them).
"""

from __future__ import annotations

from dataclasses import dataclass

from pydicom.pixels import get_decoder
from pydicom.uid import (
    HTJ2K,
    JPEG2000,
    UID,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    HTJ2KLossless,
    HTJ2KLosslessRPCL,
    ImplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEGBaseline8Bit,
    JPEGExtended12Bit,
    JPEGLossless,
    JPEGLosslessSV1,
    JPEGLSLossless,
    JPEGLSNearLossless,
    RLELossless,
)

__all__ = [
    "ACCEPTED_TRANSFER_SYNTAXES",
    "CANDIDATES",
    "Syntax",
    "accepted_transfer_syntaxes",
    "decodable",
    "decoding_plugins",
    "is_lossy",
    "refusal",
    "unavailable",
]


@dataclass(frozen=True)
class Syntax:
    """A transfer syntax the node accepts when it decodes here.

    ``packages`` are the PyPI packages (in pyproject.toml) that give pydicom a decoder for
    it; empty when pydicom decodes it alone. ``lossy``: the pixels may differ from the
    scanner's (the segmentation still runs; the planner's TPS has its own copy of the images).
    """

    uid: UID
    lossy: bool
    packages: tuple[str, ...] = ()

    @property
    def name(self) -> str:
        return f"{self.uid.name} ({self.uid})"


_LIBJPEG = ("pylibjpeg", "pylibjpeg-libjpeg")
_OPENJPEG = ("pylibjpeg", "pylibjpeg-openjpeg")

#: Every transfer syntax the node accepts where it decodes, uncompressed first.
CANDIDATES: tuple[Syntax, ...] = (
    Syntax(ExplicitVRLittleEndian, False),
    Syntax(ImplicitVRLittleEndian, False),
    Syntax(DeflatedExplicitVRLittleEndian, False),
    Syntax(ExplicitVRBigEndian, False),  # retired, still sent by old systems
    Syntax(JPEGLosslessSV1, False, _LIBJPEG),
    Syntax(JPEGLossless, False, _LIBJPEG),
    Syntax(JPEGLSLossless, False, ("pyjpegls",) + _LIBJPEG),
    Syntax(JPEG2000Lossless, False, _OPENJPEG + ("pillow",)),
    Syntax(HTJ2KLossless, False, _OPENJPEG),
    Syntax(HTJ2KLosslessRPCL, False, _OPENJPEG),
    Syntax(RLELossless, False, ("pylibjpeg-rle",)),
    Syntax(JPEGBaseline8Bit, True, _LIBJPEG + ("pillow",)),
    Syntax(JPEGExtended12Bit, True, _LIBJPEG),
    Syntax(JPEGLSNearLossless, True, ("pyjpegls",) + _LIBJPEG),
    Syntax(JPEG2000, True, _OPENJPEG + ("pillow",)),
    Syntax(HTJ2K, True, _OPENJPEG),
)

#: Syntaxes whose pixel data is not in the dataset (a JPIP server holds it).
_REFERENCED = frozenset(
    {"1.2.840.10008.1.2.4.94", "1.2.840.10008.1.2.4.95", "1.2.840.10008.1.2.4.204", "1.2.840.10008.1.2.4.205"}
)
#: MPEG-2, MPEG-4 AVC/H.264 and HEVC/H.265: video, never a stack of CT or MR slices.
_VIDEO = frozenset(f"1.2.840.10008.1.2.4.{n}" for n in range(100, 109))


def decoding_plugins(uid: str) -> tuple[str, ...]:
    """The pydicom plugins that decode ``uid`` here (``("pydicom",)`` for native syntaxes);
    empty when none is installed or pydicom has no decoder for it at all."""
    try:
        decoder = get_decoder(UID(uid))
    except NotImplementedError:  # pydicom has no decoder for this syntax
        return ()
    if not decoder.is_available:
        return ()
    return decoder.available_plugins or ("pydicom",)


def decodable(uid: str) -> bool:
    """Whether pydicom can decode pixel data of transfer syntax ``uid`` in this installation."""
    return bool(decoding_plugins(uid))


def is_lossy(uid: str) -> bool:
    """Whether ``uid`` is one of the accepted lossy syntaxes (JPEG baseline/extended,
    JPEG-LS near-lossless, JPEG 2000 and HTJ2K that allow loss)."""
    return any(s.uid == uid and s.lossy for s in CANDIDATES)


def accepted_transfer_syntaxes() -> list[UID]:
    """The candidates that decode here, in :data:`CANDIDATES` order (uncompressed first)."""
    return [s.uid for s in CANDIDATES if decodable(s.uid)]


def refusal(uid: str) -> str | None:
    """Why the node does not accept transfer syntax ``uid``, one sentence naming it; None
    when it is accepted."""
    uid = UID(str(uid).strip().rstrip("\x00"))
    if uid in ACCEPTED_TRANSFER_SYNTAXES:
        return None
    name = f"{uid.name} ({uid})" if uid.name != uid else uid
    if not uid.is_transfer_syntax:
        return f"{name} is not accepted: it is not a transfer syntax pydicom knows"
    if uid in _REFERENCED:
        return f"{name} is not accepted: its pixel data is not in the dataset but on a JPIP server"
    if uid in _VIDEO:
        return f"{name} is not accepted: it is video, never a CT or MR image series, and pydicom has no decoder for it"
    candidate = next((s for s in CANDIDATES if s.uid == uid), None)
    if candidate is not None:
        return (
            f"{name} is not accepted: no pydicom decoder for it is installed "
            f"(pip install {' '.join(candidate.packages)})"
        )
    return f"{name} is not accepted: pydicom has no decoder for it"


def unavailable() -> list[str]:
    """One sentence per candidate that this installation cannot decode (so does not offer),
    naming the packages that would decode it; empty on a complete installation."""
    return [str(refusal(s.uid)) for s in CANDIDATES if s.uid not in ACCEPTED_TRANSFER_SYNTAXES]


#: What the Storage SCP offers for every image and RTSTRUCT SOP class.
ACCEPTED_TRANSFER_SYNTAXES: list[UID] = accepted_transfer_syntaxes()
