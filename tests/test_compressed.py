"""Compressed transfer syntaxes through the running node (issue 11, item 2).

A PACS or TPS may send its images JPEG, JPEG-LS, JPEG 2000, HTJ2K or RLE compressed, or
deflated. The node offers at negotiation every syntax that decodes here
(:mod:`dicom_node.transfer_syntaxes`), stores the bytes as received, and decodes when the
case is loaded. The files are made by real encoders: dcmtk's dcmcjpeg, dcmcjpls, dcmcrle
and dcmconv, OpenJPEG (pylibjpeg-openjpeg, through pydicom's ``Dataset.compress``) and
OpenJPH's ojph_compress (HTJ2K); dcmtk's storescu sends them, proposing each file's own
syntax.

The images are the CT phantom (so the tests run without ../shared) and, where present, the
real GE CT of ../shared/data (signed 16-bit, 512x512).
"""

from __future__ import annotations

import hashlib
import shutil
import subprocess
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pydicom
import pytest
from helpers import (
    NodeProcess,
    StoreSCP,
    check_result,
    image_files,
    phantom,
    shared_path,
    stored_successes,
    storescu,
    wait_for,
    write_config,
)
from pydicom.encaps import encapsulate, generate_frames
from pydicom.uid import (
    HTJ2K,
    JPEG2000,
    UID,
    CTImageStorage,
    DeflatedExplicitVRLittleEndian,
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
    RTStructureSetStorage,
    generate_uid,
)

from dicom_node.config import config_from_data
from dicom_node.db import Database
from dicom_node.part10 import read_part10
from dicom_node.store import Origin, Store, Undecodable
from dicom_node.transfer_syntaxes import (
    ACCEPTED_TRANSFER_SYNTAXES,
    CANDIDATES,
    decodable,
    decoding_plugins,
    refusal,
    unavailable,
)
from rtstruct.series import VolumeError, load_series

pytestmark = pytest.mark.network

#: a syntax the node never accepts: JPEG 2000 Part 2 multi-component has no pydicom decoder
J2K_PART2 = UID("1.2.840.10008.1.2.4.92")


# --------------------------------------------------------------------------------------
# encoders
# --------------------------------------------------------------------------------------
def _tool(name: str, package: str) -> str:
    path = shutil.which(name)
    if path is None:
        pytest.skip(f"{name} not found: install it with 'sudo apt-get install {package}' (or run 'make system-deps')")
    return path


def _dcmtk(tool: str, *options: str) -> Callable[[Path, Path], None]:
    def encode(src: Path, dst: Path) -> None:
        subprocess.run([_tool(tool, "dcmtk"), *options, str(src), str(dst)], check=True, capture_output=True)

    return encode


def _openjpeg(uid: str, **kw) -> Callable[[Path, Path], None]:
    """JPEG 2000 by OpenJPEG (pylibjpeg-openjpeg) through pydicom."""

    def encode(src: Path, dst: Path) -> None:
        ds = pydicom.dcmread(src)
        ds.compress(uid, generate_instance_uid=False, **kw)  # the prompt references the slices
        ds.save_as(dst, enforce_file_format=True)

    return encode


def _openjph(uid: str, *options: str) -> Callable[[Path, Path], None]:
    """HTJ2K by OpenJPH's ojph_compress, the codestream encapsulated by pydicom.

    Only unsigned samples: OpenJPH 0.9 (Debian 12's openjph-tools) writes wrong codestreams
    for signed ones (OpenJPEG and OpenJPH 0.31 agree on what it should have written)."""

    def encode(src: Path, dst: Path) -> None:
        exe = _tool("ojph_compress", "openjph-tools")
        ds = pydicom.dcmread(src)
        assert ds.PixelRepresentation == 0, "HTJ2K test files are made from unsigned images"
        raw, j2c = dst.with_suffix(".raw"), dst.with_suffix(".j2c")
        ds.pixel_array.astype("<u2").tofile(raw)
        geometry = ["-dims", f"{{{ds.Columns},{ds.Rows}}}", "-num_comps", "1", "-signed", "false"]
        geometry += ["-bit_depth", str(ds.BitsStored), "-downsamp", "{1,1}"]
        subprocess.run([exe, "-i", str(raw), "-o", str(j2c), *geometry, *options], check=True, capture_output=True)
        ds.PixelData = encapsulate([j2c.read_bytes()])
        ds["PixelData"].VR = "OB"
        ds.file_meta.TransferSyntaxUID = uid
        if uid == HTJ2K:
            ds.LossyImageCompression = "01"
        ds.save_as(dst, enforce_file_format=True)
        raw.unlink()
        j2c.unlink()

    return encode


@dataclass(frozen=True)
class Encoding:
    name: str
    uid: str
    encode: Callable[[Path, Path], None]
    #: for lossy syntaxes, the largest mean absolute difference from the original (HU)
    mean_error: float = 0.0


LOSSLESS = (
    Encoding("jpeg-lossless-sv1", JPEGLosslessSV1, _dcmtk("dcmcjpeg", "+e1")),
    Encoding("jpeg-lossless-p14", JPEGLossless, _dcmtk("dcmcjpeg", "+el")),
    Encoding("jpeg-ls-lossless", JPEGLSLossless, _dcmtk("dcmcjpls", "+el")),
    Encoding("rle", RLELossless, _dcmtk("dcmcrle")),
    Encoding("deflated", DeflatedExplicitVRLittleEndian, _dcmtk("dcmconv", "+td")),
    Encoding("implicit", ImplicitVRLittleEndian, _dcmtk("dcmconv", "+ti")),
    Encoding("j2k-lossless", JPEG2000Lossless, _openjpeg(JPEG2000Lossless)),
    Encoding("htj2k-lossless", HTJ2KLossless, _openjph(HTJ2KLossless, "-reversible", "true")),
    Encoding(
        "htj2k-rpcl", HTJ2KLosslessRPCL, _openjph(HTJ2KLosslessRPCL, "-reversible", "true", "-prog_order", "RPCL")
    ),
)
# dcmtk keeps the SOP Instance UIDs (+un), so the prompt still references the slices
LOSSY = (
    Encoding("jpeg-baseline", JPEGBaseline8Bit, _dcmtk("dcmcjpeg", "+eb", "+un"), mean_error=16.0),
    Encoding("jpeg-extended", JPEGExtended12Bit, _dcmtk("dcmcjpeg", "+ee", "+un"), mean_error=6.0),
    Encoding("jpeg-ls-near", JPEGLSNearLossless, _dcmtk("dcmcjpls", "+en", "+md", "2", "+un"), mean_error=2.0),
    Encoding("j2k-lossy", JPEG2000, _openjpeg(JPEG2000, j2k_cr=[20]), mean_error=32.0),
    Encoding("htj2k-lossy", HTJ2K, _openjph(HTJ2K, "-qstep", "0.002"), mean_error=6.0),
)


def _mixed_series(src: list[Path], encodings: tuple[Encoding, ...], folder: Path) -> dict[Path, Encoding]:
    """Slice k of ``src`` written in ``encodings[k % n]``: one series in every syntax."""
    folder.mkdir(parents=True)
    out = {}
    for k, path in enumerate(src):
        enc = encodings[k % len(encodings)]
        dst = folder / f"{enc.name}-{path.name}"
        enc.encode(path, dst)
        assert pydicom.dcmread(dst, stop_before_pixels=True).file_meta.TransferSyntaxUID == enc.uid, enc.name
        out[dst] = enc
    return out


def _dataset_digest(path: Path) -> tuple[str, str]:
    """(transfer syntax, sha256 of the dataset bytes after the file meta) of a Part 10 file."""
    ts, dataset, _ = read_part10(path.read_bytes())
    if ts == DeflatedExplicitVRLittleEndian:  # storescu deflates anew: the same dataset, other zlib bytes
        dataset = zlib.decompress(bytes(dataset), -zlib.MAX_WBITS)
    return ts, hashlib.sha256(dataset).hexdigest()


def _sop_uid(path: Path) -> str:
    return str(pydicom.dcmread(path, stop_before_pixels=True).SOPInstanceUID)


def _stored(node: NodeProcess, sop_uid: str) -> Path:
    (row,) = node.query("SELECT path FROM instances WHERE sop_instance_uid = ?", (sop_uid,))
    return node.data_dir / "store" / row["path"]


def _assert_stored_as_sent(node: NodeProcess, sent: list[Path]) -> list[Path]:
    """Each sent file is in the store under the syntax it was sent in, its dataset bytes unchanged."""
    stored = []
    for path in sent:
        copy = _stored(node, _sop_uid(path))
        assert _dataset_digest(copy) == _dataset_digest(path), f"{path.name} changed in the store"
        stored.append(copy)
    return stored


# --------------------------------------------------------------------------------------
# the node
# --------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def node_and_tps(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("compressed")
    tps = StoreSCP(tmp / "tps").start()
    node = NodeProcess(write_config(tmp / "node", destinations={"tps": tps.destination()})).start()
    try:
        yield node, tps
    finally:
        node.stop()
        tps.stop()


def _small_phantom(seed: int) -> dict[str, Path]:
    return phantom(seed, "CT", shape=(20, 96, 96), spacing=(2.5, 4.0, 4.0))


#: syntaxes dcmtk 3.6.7 (Debian 12) does not know: its storescu reads such a file as
#: uncompressed and fails; these files are sent with pynetdicom instead
_UNKNOWN_TO_DCMTK = frozenset({HTJ2KLossless, HTJ2KLosslessRPCL, HTJ2K})


def _storescu_profile(folder: Path) -> list[str]:
    """storescu options (``-xf FILE PROFILE``) proposing CT and RTSTRUCT storage with one
    presentation context per syntax, so that each file goes in its own syntax; by default
    storescu proposes the uncompressed ones only (and decompresses on the fly)."""
    syntaxes = [uid for uid in ACCEPTED_TRANSFER_SYNTAXES if uid not in _UNKNOWN_TO_DCMTK]
    lines = ["[[TransferSyntaxes]]"]
    for k, uid in enumerate(syntaxes, 1):
        lines += [f"[TS{k}]", f"TransferSyntax1 = {uid}"]
    lines += ["", "[[PresentationContexts]]", "[Contexts]"]
    n = 0
    for sop_class in (CTImageStorage, RTStructureSetStorage):
        for k in range(1, len(syntaxes) + 1):
            n += 1
            lines.append(f"PresentationContext{n} = {sop_class}\\TS{k}")
    lines += ["", "[[Profiles]]", "[EachSyntax]", "PresentationContexts = Contexts", ""]
    path = folder / "storescu.cfg"
    path.write_text("\n".join(lines))
    return ["-xf", str(path), "EachSyntax"]


def _pynetdicom_send(files: list[Path], port: int) -> None:
    """C-STORE each file in its own syntax with pynetdicom (the raw dataset of the file)."""
    from pynetdicom import AE

    ae = AE(ae_title="PYNETDICOM")
    for uid in sorted({_dataset_digest(f)[0] for f in files}):
        ae.add_requested_context(CTImageStorage, [uid])
    assoc = ae.associate("127.0.0.1", port, ae_title="STARDUST")
    assert assoc.is_established
    try:
        for f in files:
            status = assoc.send_c_store(f)
            assert status and status.Status == 0, f"{f.name}: {status}"
    finally:
        assoc.release()


def _send(node: NodeProcess, files: list[Path], folder: Path) -> None:
    """Send ``files`` (images, then any RTSTRUCT) each in its own syntax, all acknowledged with Success."""
    dcmtk = [f for f in files if _dataset_digest(f)[0] not in _UNKNOWN_TO_DCMTK]
    others = [f for f in files if f not in dcmtk]
    if others:
        _pynetdicom_send(others, node.port)
    out = storescu(dcmtk, node.port, extra=_storescu_profile(folder))
    text = out.stdout + out.stderr
    assert out.returncode == 0, text[-4000:]
    assert len(stored_successes(text)) == len(dcmtk), text[-4000:]
    # (a file storescu decompressed would be stored in another syntax: _assert_stored_as_sent)


def _send_case(node: NodeProcess, files: list[Path], prompt: Path, folder: Path) -> None:
    _send(node, [*files, prompt], folder)


def _result_of(node: NodeProcess, tps: StoreSCP, prompt: Path) -> Path:
    uid = _sop_uid(prompt)

    def done():
        jobs = node.query("SELECT j.* FROM jobs j JOIN cases c ON c.id = j.case_id WHERE c.rtstruct_uid = ?", (uid,))
        if jobs and jobs[0]["state"] == "failed":
            raise AssertionError(f"the job failed: {jobs[0]['error']}")
        if not jobs or jobs[0]["state"] != "done":
            return None
        sends = node.query("SELECT state FROM sends WHERE job_id = ?", (jobs[0]["id"],))
        return jobs[0] if sends and all(s["state"] == "sent" for s in sends) else None

    try:
        job = _wait_raising(done, 180, "the case to be delivered")
    except AssertionError as exc:
        raise AssertionError(f"{exc}; cases {node.cases()}; log:\n{node.log_text()[-3000:]}") from None
    return tps.received()[job["result_sop_uid"]]


def _wait_raising(predicate, timeout: float, what: str):
    """``wait_for`` that stops at once when ``predicate`` raises AssertionError (a failed job)."""
    failure: list[AssertionError] = []

    def check():
        try:
            return predicate()
        except AssertionError as exc:
            failure.append(exc)
            return True

    value = wait_for(check, timeout, 0.2, what)
    if failure:
        raise failure[0]
    return value


def _assert_clean_log(node: NodeProcess) -> None:
    log = node.log_text()
    assert "Traceback" not in log, log[-4000:]


# --------------------------------------------------------------------------------------
# tests
# --------------------------------------------------------------------------------------
def test_negotiation_accepts_exactly_the_syntaxes_that_decode_here(node_and_tps):
    from pynetdicom import AE

    node, _ = node_and_tps
    # this installation has every plugin of pyproject.toml: every candidate decodes
    assert unavailable() == []
    assert ACCEPTED_TRANSFER_SYNTAXES == [s.uid for s in CANDIDATES]
    assert len(ACCEPTED_TRANSFER_SYNTAXES) == 16
    assert all(decodable(uid) and decoding_plugins(uid) for uid in ACCEPTED_TRANSFER_SYNTAXES)
    assert decoding_plugins(JPEGLSLossless) == ("pyjpegls", "pylibjpeg")
    not_offered = [J2K_PART2, "1.2.840.10008.1.2.4.100", "1.2.840.10008.1.2.4.94", "1.2.840.10008.1.2.1.98"]
    assert not any(decodable(uid) for uid in not_offered)
    assert refusal(J2K_PART2) == (
        "JPEG 2000 Part 2 Multi-component Image Compression (Lossless Only) (1.2.840.10008.1.2.4.92) "
        "is not accepted: pydicom has no decoder for it"
    )
    assert "MPEG2 Main Profile / Main Level (1.2.840.10008.1.2.4.100) is not accepted: it is video" in refusal(
        "1.2.840.10008.1.2.4.100"
    )
    assert refusal(JPEGLSLossless) is None

    # one presentation context per syntax, as dcmtk's storescu proposes them
    ae = AE(ae_title="PYNETDICOM")
    proposed = [*ACCEPTED_TRANSFER_SYNTAXES, *not_offered]
    for uid in proposed:
        ae.add_requested_context(CTImageStorage, [uid])
    assoc = ae.associate("127.0.0.1", node.port, ae_title="STARDUST")
    assert assoc.is_established
    try:
        accepted = {cx.transfer_syntax[0] for cx in assoc.accepted_contexts}
        rejected = {cx.transfer_syntax[0] for cx in assoc.rejected_contexts}
    finally:
        assoc.release()
    assert accepted == set(ACCEPTED_TRANSFER_SYNTAXES)
    assert rejected == set(not_offered)


def test_a_case_in_every_lossless_syntax_is_decoded_exactly_segmented_and_delivered(node_and_tps, tmp_path):
    node, tps = node_and_tps
    p = _small_phantom(21)
    originals = image_files(p)
    sent = _mixed_series(originals, LOSSLESS, tmp_path / "lossless")
    assert {e.uid for e in sent.values()} == {e.uid for e in LOSSLESS}
    _send_case(node, list(sent), p["prompt"], tmp_path)
    result = _result_of(node, tps, p["prompt"])

    stored = _assert_stored_as_sent(node, list(sent))
    # what the worker decoded is what the scanner wrote, slice by slice
    decoded, original = load_series(stored), load_series(originals)
    assert decoded.sop_instance_uids == original.sop_instance_uids
    assert decoded.array.dtype == original.array.dtype
    np.testing.assert_array_equal(decoded.array, original.array)
    # dciodvfy, references; the classic engine scores about 0.74 on this small phantom (the
    # decoded pixels are the original ones, checked above)
    check_result(result, p, min_dice=0.6)
    # the result goes to the TPS uncompressed (it has no pixels to compress)
    assert pydicom.dcmread(result).file_meta.TransferSyntaxUID in (ExplicitVRLittleEndian, ImplicitVRLittleEndian)
    assert "compressed pixel data decoded" in node.log_text()
    _assert_clean_log(node)


def test_a_case_in_every_lossy_syntax_is_decoded_within_its_loss_and_delivered(node_and_tps, tmp_path):
    node, tps = node_and_tps
    p = _small_phantom(3)  # the seed test_watch segments at this size
    originals = image_files(p)
    sent = _mixed_series(originals, LOSSY, tmp_path / "lossy")
    _send_case(node, list(sent), p["prompt"], tmp_path)
    result = _result_of(node, tps, p["prompt"])

    stored = _assert_stored_as_sent(node, list(sent))
    for copy, (path, enc) in zip(stored, sent.items()):
        original = next(f for f in originals if path.name.endswith(f.name))
        error = np.abs(load_series([copy]).array.astype(float) - load_series([original]).array.astype(float))
        assert 0 < error.mean() <= enc.mean_error, f"{enc.name}: mean error {error.mean():.2f} HU"
        if enc.uid == JPEGLSNearLossless:
            assert error.max() <= 2  # NEAR=2: no pixel further than that
    check_result(result, p, min_dice=0.5)
    _assert_clean_log(node)


def test_real_ct_compressed_losslessly_is_stored_as_sent_and_decodes_to_the_same_values(node_and_tps, tmp_path):
    """The GE CT (signed 16-bit, 512x512) in each lossless syntax but HTJ2K (see _openjph),
    one series per syntax with its own UIDs, all in one storescu association."""
    node, _ = node_and_tps
    src = sorted(shared_path("ge-phantom-ct", "CT").glob("*.dcm"))
    encodings = [e for e in LOSSLESS if e.uid not in (HTJ2KLossless, HTJ2KLosslessRPCL)]
    series: dict[str, list[Path]] = {}
    for enc in encodings:
        folder = tmp_path / enc.name
        folder.mkdir()
        series_uid = generate_uid()
        for path in src:
            ds = pydicom.dcmread(path)
            ds.SeriesInstanceUID = series_uid
            ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
            plain = folder / f"plain-{path.name}"
            ds.save_as(plain, enforce_file_format=True)
            enc.encode(plain, folder / path.name)
        series[enc.name] = sorted(folder.glob("plain-*.dcm"))
    sent = [f for folder in series for f in sorted((tmp_path / folder).iterdir()) if not f.name.startswith("plain-")]
    _send(node, sent, tmp_path)

    stored = _assert_stored_as_sent(node, sent)
    assert {_dataset_digest(f)[0] for f in stored} == {e.uid for e in encodings}
    for enc in encodings:
        plain = series[enc.name]
        copies = [_stored(node, _sop_uid(f)) for f in plain]
        decoded, original = load_series(copies), load_series(plain)
        assert original.array.min() < -1024  # signed values below -1024 HU (padding), kept exactly
        np.testing.assert_array_equal(decoded.array, original.array, err_msg=enc.name)


def test_a_syntax_that_does_not_decode_is_not_accepted_nor_imported(node_and_tps, tmp_path):
    node, _ = node_and_tps
    p = _small_phantom(23)
    src = image_files(p)[0]
    j2k = tmp_path / "j2k.dcm"
    _openjpeg(JPEG2000Lossless)(src, j2k)
    # the same codestream labelled JPEG 2000 Part 2: storescu can neither send it as it is
    # (the node does not offer the syntax) nor decompress it (dcmtk has no decoder either)
    part2 = tmp_path / "part2.dcm"
    ds = pydicom.dcmread(j2k)
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    ds.file_meta.TransferSyntaxUID = J2K_PART2
    ds.save_as(part2, enforce_file_format=True)
    out = storescu([part2], node.port)
    assert out.returncode != 0 or not stored_successes(out.stdout + out.stderr)
    assert "Store Failed" in out.stdout + out.stderr, out.stdout[-2000:] + out.stderr[-2000:]
    assert not node.query("SELECT * FROM instances WHERE sop_instance_uid = ?", (str(ds.SOPInstanceUID),))

    # the watch folder path (Store.import_file) takes compressed files as they are, and
    # refuses what negotiation would not accept, with the sentence that names the syntax
    cfg = config_from_data({"access": {"calling_aets": ["X"]}, "data_dir": str(tmp_path / "data")})
    store = Store(cfg.store_dir, Database(cfg.db_path), fsync=False)
    for enc in (LOSSLESS[0], LOSSLESS[2], LOSSY[0]):
        f = tmp_path / f"{enc.name}.dcm"
        enc.encode(src, f)
        stored = store.import_file(f, Origin(source="watch", calling_aet="WATCHFOLDER"))
        assert _dataset_digest(stored.path) == _dataset_digest(f)
        load_series([stored.path])
    with pytest.raises(Undecodable) as refused:
        store.import_file(part2, Origin(source="watch", calling_aet="WATCHFOLDER"))
    assert str(refused.value) == refusal(J2K_PART2)


def test_a_stored_slice_that_does_not_decode_fails_the_job_naming_its_syntax(node_and_tps, tmp_path):
    node, _ = node_and_tps
    p = _small_phantom(24)
    sent = _mixed_series(image_files(p), (LOSSLESS[2],), tmp_path / "jpeg-ls")  # all JPEG-LS lossless
    # one slice's codestream damaged in the middle (its frame and end markers intact): the
    # DICOM structure is sound, so it is stored with Success; neither decoder can read it
    damaged = sorted(sent)[7]
    ds = pydicom.dcmread(damaged)
    frame = next(generate_frames(ds.PixelData, number_of_frames=1))
    noise = np.random.default_rng(7).integers(0, 256, len(frame) - 400, dtype=np.uint8).tobytes()
    ds.PixelData = encapsulate([frame[:200] + noise + frame[-200:]])
    ds.save_as(damaged, enforce_file_format=True)
    _send_case(node, list(sent), p["prompt"], tmp_path)

    uid = _sop_uid(p["prompt"])

    def failed():
        jobs = node.query("SELECT j.* FROM jobs j JOIN cases c ON c.id = j.case_id WHERE c.rtstruct_uid = ?", (uid,))
        return jobs and jobs[0]["state"] == "failed" and jobs[0]

    job = wait_for(failed, 120, 0.2, "the job to fail")
    error = job["error"]
    assert "JPEG-LS Lossless Image Compression (1.2.840.10008.1.2.4.80)" in error, error
    assert "every decoding plugin failed (pylibjpeg: " in error and "pyjpegls: " in error, error
    assert f"{_sop_uid(damaged)}.dcm" in error, error  # the stored file of the damaged slice
    _assert_clean_log(node)  # pydicom's per-plugin tracebacks stay out of the node's log

    # a codestream cut off before its end marker decodes to garbage with libjpeg, without an
    # error: refused before decoding
    cut = tmp_path / "cut.dcm"
    ds = pydicom.dcmread(sorted(sent)[3])
    frame = next(generate_frames(ds.PixelData, number_of_frames=1))
    ds.PixelData = encapsulate([frame[: len(frame) // 2]])
    ds.save_as(cut, enforce_file_format=True)
    with pytest.raises(VolumeError) as refused:
        load_series([cut])
    assert str(refused.value) == (
        f"cannot decode pixel data of {cut} (JPEG-LS Lossless Image Compression (1.2.840.10008.1.2.4.80)): "
        "its codestream has no end marker (FFD9), the compressed data is cut off or damaged"
    )
