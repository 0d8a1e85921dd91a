"""Attributes copied from the images are made valid for their VR (rtstruct.conform), and
the RTSTRUCT, SEG and Secondary Capture made from real images edited to carry typical bad
values pass dciodvfy with no errors."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pydicom
import pytest
from helpers import dciodvfy_errors, shared_path

from rtstruct.conform import UTF8, character_set, conform, conform_dataset
from rtstruct.secondary_capture import Picture, write_secondary_captures
from rtstruct.seg import write_seg
from rtstruct.series import load_series
from rtstruct.writer import RoiMask, write_rtstruct


# -- the rules, per VR --------------------------------------------------------------------
def test_short_and_long_strings_are_truncated_to_their_vr(caplog):
    with caplog.at_level(logging.WARNING):
        assert conform("StudyID", "A" * 17) == "A" * 16  # SH
    assert "StudyID of the images has 17 characters, SH allows 16: truncated" in caplog.text
    assert "AAAA" not in caplog.text  # never the value
    assert conform("StudyDescription", "d" * 70) == "d" * 64  # LO
    assert conform("PositionReferenceIndicator", "x" * 70) == "x" * 64  # LO
    assert conform("StationName", "s" * 20) == "s" * 16  # SH
    assert conform("PatientComments", "c" * 11000) == "c" * 10240  # LT
    assert conform("StudyID", "  S1  ") == "S1"
    assert conform("StudyID", "   ") is None
    assert conform("StudyID", "S1") == "S1"


def test_lengths_are_counted_in_bytes_of_the_character_set():
    # é is 1 byte in ISO_IR 100, 2 in UTF-8: never split a character
    assert conform("StudyID", "é" * 17, "ISO_IR 100") == "é" * 16
    assert conform("StudyID", "é" * 17, UTF8) == "é" * 8
    assert conform("StudyID", "山" * 10, UTF8) == "山" * 5


def test_control_characters_and_backslashes_are_removed():
    assert conform("AccessionNumber", "A12\x0334") == "A1234"
    assert conform("StudyDescription", "CT\\THORAX") == "CT THORAX"
    assert conform("PatientComments", "line 1\r\nline 2\x07") == "line 1\r\nline 2"  # LT keeps line breaks
    assert conform("StudyDescription", "a\nb") == "ab"  # LO does not


def test_code_strings_keep_upper_case_letters_digits_space_and_underscore():
    assert conform("BodyPartExamined", "chest-wall") == "CHESTWALL"
    assert conform("PatientPosition", "hfs") == "HFS"
    assert conform("PatientSex", "male") == "M"
    assert conform("PatientSex", "Female") == "F"
    assert conform("PatientSex", "X") is None
    assert conform("PatientIdentityRemoved", "yes") == "YES"
    assert conform("ImageType", ["original", "primary", "axial"]) == ["ORIGINAL", "PRIMARY", "AXIAL"]


def test_person_names_components_and_groups():
    assert conform("PatientName", "F" * 80 + "^Given") == "F" * 64
    assert conform("PatientName", "Doe^John^M^Dr^Jr^extra^more") == "Doe^John^M^Dr^Jr"
    assert conform("PatientName", "Doe^John^^^") == "Doe^John"
    assert conform("PatientName", "Yamada^Tarou=山田^太郎=やまだ^たろう=x") == "Yamada^Tarou=山田^太郎=やまだ^たろう"
    assert conform("ReferringPhysicianName", "Smith^" + "J" * 70) == ("Smith^" + "J" * 70)[:64]
    assert conform("PhysiciansOfRecord", ["A^B", "C\x01^D"]) == ["A^B", "C^D"]
    assert conform("PatientName", "Doe^John") == "Doe^John"


def test_dates_times_ages_and_numbers_are_validated():
    assert conform("StudyDate", "20230105") == "20230105"
    assert conform("StudyDate", "2023-01-05") is None
    assert conform("StudyDate", "20230230") is None
    assert conform("PatientBirthDate", "unknown") is None
    assert conform("StudyTime", "101010.123") == "101010.123"
    assert conform("StudyTime", "1010") == "1010"
    assert conform("StudyTime", "25:61") is None
    assert conform("StudyTime", "256100") is None
    assert conform("AcquisitionDateTime", "20230105101010.5+0100") == "20230105101010.5+0100"
    assert conform("AcquisitionDateTime", "2023-01-05T10:10") is None
    assert conform("PatientAge", "045Y") == "045Y"
    assert conform("PatientAge", "45") is None
    assert conform("SeriesNumber", "12") == "12"
    assert conform("SeriesNumber", "1.5") is None
    assert conform("SeriesNumber", "99999999999") is None  # beyond a signed 32-bit integer
    assert conform("PatientWeight", "72.5") == "72.5"
    assert conform("PatientWeight", 72.5) == "72.5"
    assert conform("PatientWeight", "heavy") is None
    long = conform("PatientSize", "1.23456789012345678")
    assert len(long) <= 16 and abs(float(long) - 1.23456789012345678) < 1e-12
    assert conform("PixelSpacing", ["0.9", "x"]) is None  # VM 2: one valid value is not enough
    assert conform("ImageType", ["ORIGINAL", "", "AXIAL"]) == ["ORIGINAL", "", "AXIAL"]  # empty values kept in text


def test_multi_values_given_to_a_single_valued_attribute_are_joined():
    assert conform("StudyDescription", ["CT", "THORAX"]) == "CT THORAX"


def test_character_set_is_kept_when_values_encode_in_it_else_utf8(caplog):
    assert character_set({"PatientName": "Doe"}) is None
    assert character_set({"PatientName": "Müller"}) == UTF8
    assert character_set({"SpecificCharacterSet": "ISO_IR 100", "PatientName": "Müller"}) == "ISO_IR 100"
    with caplog.at_level(logging.WARNING):
        assert character_set({"SpecificCharacterSet": "ISO_IR 100", "PatientName": "山田"}) == UTF8
    assert "cannot be encoded" in caplog.text and "山田" not in caplog.text
    assert character_set({"SpecificCharacterSet": "ISO_IR 100"}, ["GTV_中"]) == UTF8
    iso2022 = {"SpecificCharacterSet": ["", "ISO 2022 IR 87"], "PatientName": "Yamada^Tarou=山田^太郎"}
    assert character_set(iso2022) == ["", "ISO 2022 IR 87"]
    assert character_set({"SpecificCharacterSet": "ISO-8859-1", "PatientName": "Doe"}) == UTF8  # not a defined term


def test_conform_dataset_empties_type_2_and_removes_type_3():
    ds = pydicom.Dataset()
    ds.StudyDate = "2023-01-05"  # Type 2: emptied
    ds.PatientAge = "45"  # Type 3: removed
    ds.StudyID = "A" * 17
    ds.StudyDescription = "ok"
    done = conform_dataset(ds)
    assert ds.StudyDate == "" and "PatientAge" not in ds and ds.StudyID == "A" * 16 and ds.StudyDescription == "ok"
    assert set(done) == {"StudyDate", "PatientAge", "StudyID"}


# -- real images edited to carry bad values -----------------------------------------------
BAD = {
    "StudyID": "S" * 17,
    "StudyDescription": "D" * 70,
    "ReferringPhysicianName": "Referrer^" + "R" * 70,
    "StudyDate": "2023-01-05",
    "StudyTime": "25:61",
    "PatientBirthDate": "unknown",
    "AccessionNumber": "ACC\x0712",
    "PatientSex": "male",
    "PositionReferenceIndicator": "P" * 70,
}
GOOD = {
    "PatientID": "LUNG1-001-EDIT",
    "PatientWeight": "72.5",
    "PatientAge": "068Y",
    "PhysiciansOfRecord": "Good^Doctor",
}


def lung1_slices(n: int = 4) -> list[Path]:
    folder = shared_path("lung1-001-ct", "CT")
    headers = [(p, pydicom.dcmread(p, stop_before_pixels=True)) for p in sorted(folder.glob("*.dcm"))]
    headers.sort(key=lambda h: float(h[1].ImagePositionPatient[2]))
    middle = len(headers) // 2
    return [p for p, _ in headers[middle : middle + n]]


def edited_copies(folder: Path, charset: str, family: str) -> list[Path]:
    out = []
    folder.mkdir()
    for path in lung1_slices():
        ds = pydicom.dcmread(path)
        ds.SpecificCharacterSet = charset
        for keyword, value in {**BAD, **GOOD}.items():
            setattr(ds, keyword, value)
        # 5 components, an 80-character family name with a non-ASCII letter.
        ds.PatientName = f"{family}{'F' * 79}^Given^Middle^Dr^Jr"
        target = folder / path.name
        ds.save_as(target)
        out.append(target)
    return out


@pytest.mark.parametrize(("charset", "family"), [("ISO_IR 100", "é"), ("ISO_IR 192", "山")])
def test_results_from_images_with_bad_values_pass_dciodvfy(tmp_path, charset, family, caplog):
    files = edited_copies(tmp_path / "ct", charset, family)
    volume = load_series(files)
    mask = np.zeros(volume.geometry.shape, dtype=bool)
    mask[1:3, 200:260, 200:260] = True
    rois = [RoiMask("GTV_AI", mask, algorithm_name="test", algorithm_version="1")]
    written: dict[str, Path] = {}
    with caplog.at_level(logging.WARNING):
        rt = write_rtstruct(volume, rois)
        written["RTSTRUCT"] = tmp_path / "rt.dcm"
        rt.save_as(written["RTSTRUCT"], enforce_file_format=True)
        seg = write_seg(volume, files, rois)
        written["SEG"] = tmp_path / "seg.dcm"
        seg.save_as(written["SEG"], enforce_file_format=True)
        rgb = np.zeros((64, 64, 3), dtype=np.uint8)
        (sc,) = write_secondary_captures(volume, [Picture(rgb, 1, "GTV_AI: slice 2")])
        written["SC"] = tmp_path / "sc.dcm"
        sc.save_as(written["SC"], enforce_file_format=True)
    assert "StudyID of the images has 17 characters, SH allows 16: truncated" in caplog.text
    assert "S" * 16 not in caplog.text and "F" * 20 not in caplog.text  # never the values
    for kind, path in written.items():
        errors = dciodvfy_errors(path)
        assert errors == [], f"{kind}: {errors}"
        ds = pydicom.dcmread(path)
        assert ds.SpecificCharacterSet == charset, kind
        assert ds.StudyID == "S" * 16
        assert ds.StudyDescription == "D" * 64
        assert ds.StudyDate == "" and ds.StudyTime == "" and ds.PatientBirthDate == ""
        assert ds.AccessionNumber == "ACC12"
        assert ds.PatientSex == "M"
        assert str(ds.ReferringPhysicianName) == ("Referrer^" + "R" * 70)[:64]
        name = str(ds.PatientName)
        limit = 64 if charset == "ISO_IR 100" else 64 - 2  # 山 is 3 bytes in UTF-8
        assert name == (family + "F" * 79)[:limit], kind
        # valid values are copied unchanged
        assert ds.PatientID == GOOD["PatientID"]
        assert ds.StudyInstanceUID == volume.study_instance_uid
        assert ds.PatientAge == GOOD["PatientAge"]
        assert float(ds.PatientWeight) == 72.5
        assert str(ds.PhysiciansOfRecord) == GOOD["PhysiciansOfRecord"]
        if kind != "SC":  # the Secondary Capture IOD has no Frame of Reference module
            assert ds.PositionReferenceIndicator == "P" * 64
