"""Node configuration (config/node.yaml) and DICOM UID validation."""

from __future__ import annotations

import subprocess

import pytest
import yaml
from helpers import CLI, REPO

from dicom_node.config import ConfigError, config_from_data, load_config
from dicom_node.uids import InvalidUID, is_valid_uid, validate_uid

MINIMAL = {"access": {"calling_aets": ["TPS"]}}


# -- UIDs --------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "uid",
    ["1.2", "1.2.840.10008.5.1.4.1.1.2", "0.0", "2.25.329800735698586629295641978511506172918", "1.2.3\x00", "1.2.3 "],
)
def test_valid_uids(uid):
    assert is_valid_uid(uid)
    assert validate_uid(uid) == uid.rstrip("\x00 ")


@pytest.mark.parametrize(
    "uid, why",
    [
        ("../../etc", "characters other than digits"),
        ("1.2/3", "characters other than digits"),
        ("1.2..3", "empty component"),
        (".1.2", "empty component"),
        ("1.2.", "empty component"),
        ("1.02.3", "leading zero"),
        ("12345", "single component"),
        ("", "empty"),
        ("1." + "2" * 70, "at most 64"),
        ("1.2.3\n4", "characters other than digits"),
    ],
)
def test_invalid_uids_name_the_problem(uid, why):
    assert not is_valid_uid(uid)
    with pytest.raises(InvalidUID, match=why) as err:
        validate_uid(uid, "StudyInstanceUID")
    assert "StudyInstanceUID" in str(err.value)


# -- configuration ---------------------------------------------------------------------------
def test_shipped_node_yaml_is_valid_and_documented():
    cfg = load_config(REPO / "config" / "node.yaml")
    assert cfg.ae_title == "STARDUST"
    assert cfg.rules == (REPO / "config" / "rules.yaml").resolve()  # relative to the file
    assert cfg.access.calling_aets and not cfg.access.allow_any_calling_aet  # allow-list on by default
    assert not cfg.access.allow_any_network
    assert cfg.storage.fsync
    assert cfg.problems() == []  # rules file valid and its destinations defined
    # every key of the model appears in the shipped file (documented there)
    text = (REPO / "config" / "node.yaml").read_text()
    data = yaml.safe_load(text)

    def keys(model, prefix=""):
        for name in type(model).model_fields:
            if name == "source":
                continue
            value = getattr(model, name)
            yield prefix + name
            if hasattr(type(value), "model_fields"):
                yield from keys(value, prefix + name + ".")

    for key in keys(cfg):
        node = data
        for part in key.split("."):
            assert isinstance(node, dict) and part in node, f"{key} is not documented in config/node.yaml"
            node = node[part]


def test_errors_name_the_key():
    with pytest.raises(ConfigError) as err:
        config_from_data({**MINIMAL, "network": {"port": 70000, "bogus": 1}})
    text = str(err.value)
    assert "network.port" in text and "65535" in text
    assert "network.bogus: unknown key" in text


@pytest.mark.parametrize(
    "data, key",
    [
        ({"access": {"calling_aets": []}}, "access"),
        ({**MINIMAL, "ae_title": "A" * 17}, "ae_title"),
        ({**MINIMAL, "access": {"calling_aets": ["TPS"], "networks": ["10.0.0.300/8"]}}, "access.networks"),
        ({**MINIMAL, "network": {"bind": "localhost:1"}}, "network.bind"),
        ({**MINIMAL, "network": {"sop_classes": ["CT", "NOPE"]}}, "network.sop_classes"),
        ({**MINIMAL, "destinations": {"tps": {"host": "h", "port": 104}}}, "destinations.tps.ae_title"),
        ({**MINIMAL, "tls": {"enabled": True}}, "tls"),
        ({**MINIMAL, "storage": {"cleanup_cron": "every night"}}, "storage.cleanup_cron"),
        ({**MINIMAL, "workers": {"devices": ["gpu0"]}}, "workers.devices"),
        ({}, "access"),
    ],
)
def test_bad_values(data, key):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        config_from_data(data, source="node.yaml")


def test_relative_paths_resolve_against_the_config_file(tmp_path):
    (tmp_path / "sub").mkdir()
    path = tmp_path / "sub" / "node.yaml"
    path.write_text(yaml.safe_dump({**MINIMAL, "data_dir": "../data", "watch": {"import_dir": "in"}}))
    cfg = load_config(path)
    assert cfg.data_dir == (tmp_path / "data").resolve()
    assert cfg.watch.import_dir == (tmp_path / "sub" / "in").resolve()
    assert cfg.db_path == cfg.data_dir / "node.db"


def test_secret_from_env_and_file(tmp_path, monkeypatch):
    cert, key = tmp_path / "c.pem", tmp_path / "k.pem"
    cert.write_text("x")
    key.write_text("x")
    pw = tmp_path / "pw"
    pw.write_text("s3cret\n")
    cfg = config_from_data(
        {
            **MINIMAL,
            "tls": {"enabled": True, "cert_file": str(cert), "key_file": str(key), "key_password_file": str(pw)},
        }
    )
    assert cfg.tls.key_password() == "s3cret"
    cfg = config_from_data(
        {
            **MINIMAL,
            "tls": {
                "enabled": True,
                "cert_file": str(cert),
                "key_file": str(key),
                "key_password_env": "STARDUST_TEST_PW",
            },
        }
    )
    monkeypatch.delenv("STARDUST_TEST_PW", raising=False)
    assert any("STARDUST_TEST_PW is not set" in p for p in cfg.problems())
    monkeypatch.setenv("STARDUST_TEST_PW", "from-env")
    assert cfg.tls.key_password() == "from-env"
    assert "from-env" not in cfg.model_dump_json()  # the password itself is never part of the config


def test_config_check_cli(tmp_path):
    good = subprocess.run(
        [*CLI, "config", "check", str(REPO / "config" / "node.yaml")],
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=60,
    )
    assert good.returncode == 0, good.stderr
    assert "OK" in good.stdout
    bad = tmp_path / "node.yaml"
    bad.write_text(
        yaml.safe_dump(
            {
                **MINIMAL,
                "rules": str(tmp_path / "rules.yaml"),
                "destinations": {"tps": {"host": "h", "port": 104, "ae_title": "X"}},
            }
        )
    )
    (tmp_path / "rules.yaml").write_text(
        yaml.safe_dump(
            {"version": 1, "rules": [{"name": "r", "action": {"engine": "classic", "destinations": ["archive"]}}]}
        )
    )
    out = subprocess.run([*CLI, "config", "check", str(bad)], capture_output=True, text=True, cwd=REPO, timeout=60)
    assert out.returncode == 2
    assert "'archive' is not defined" in out.stderr
    missing = subprocess.run(
        [*CLI, "config", "check", str(tmp_path / "nope.yaml")], capture_output=True, text=True, cwd=REPO, timeout=60
    )
    assert missing.returncode == 2 and "cannot read" in missing.stderr


def test_structured_logs_text_and_json():
    import json
    import logging

    from dicom_node.logs import JsonFormatter, TextFormatter, patient_ref

    record = logging.LogRecord("dicom_node.scp", logging.INFO, __file__, 1, "stored", None, None)
    record.fields = {"sop": "1.2.3", "bytes": 42, "why": "two words"}
    assert json.loads(JsonFormatter().format(record)) | {"ts": 0} == {
        "ts": 0,
        "level": "INFO",
        "logger": "dicom_node.scp",
        "event": "stored",
        "sop": "1.2.3",
        "bytes": 42,
        "why": "two words",
    }
    assert TextFormatter().format(record).endswith('stored sop=1.2.3 bytes=42 why="two words"')
    ref = patient_ref("PAT-0001", b"k" * 32)
    assert ref.startswith("p:") and "PAT" not in ref and ref == patient_ref("PAT-0001", b"k" * 32)
    assert ref != patient_ref("PAT-0001", b"j" * 32)  # keyed: not reversible by hashing candidate IDs
