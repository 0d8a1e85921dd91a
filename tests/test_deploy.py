"""deploy/: the install script (staged into a temp root) and the systemd unit."""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import stat
import subprocess
from pathlib import Path

import pytest
from helpers import REPO

INSTALL = REPO / "deploy" / "install.sh"
UNIT = REPO / "deploy" / "stardust-node.service"


def install(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    proc = subprocess.run(["bash", str(INSTALL), *args], capture_output=True, text=True, timeout=120)
    if check:
        assert proc.returncode == 0, proc.stdout + proc.stderr
    return proc


def snapshot(root: Path) -> dict[str, tuple[str, int, str]]:
    """path -> (permission bits, mtime_ns, sha256 for files)"""
    out = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            p = Path(dirpath) / name
            st = p.lstat()
            digest = hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else ""
            out[str(p.relative_to(root))] = (oct(stat.S_IMODE(st.st_mode)), st.st_mtime_ns, digest)
    return out


def mode(p: Path) -> str:
    return oct(stat.S_IMODE(p.stat().st_mode))


def unit_settings(text: str) -> dict[str, list[str]]:
    """Key -> values of a unit file (keys may repeat, e.g. Environment=)."""
    out: dict[str, list[str]] = {}
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith(("#", ";", "[")):
            continue
        key, _, value = line.partition("=")
        out.setdefault(key, []).append(value)
    return out


# --------------------------------------------------------------------------------------
def test_install_script_syntax_and_shellcheck():
    subprocess.run(["bash", "-n", str(INSTALL)], check=True)
    tool = shutil.which("shellcheck")
    if tool is None:
        pytest.skip("shellcheck not found: install it with 'sudo apt-get install shellcheck'")
    proc = subprocess.run([tool, "--severity=style", str(INSTALL)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout


def test_staged_install_lays_out_files_with_permissions_and_a_second_run_changes_nothing(tmp_path):
    root = tmp_path / "root"
    first = install("--root", str(root), "--skip-venv")
    assert "--root: not creating the user 'stardust'" in first.stdout
    assert "change(s) made" in first.stdout

    expected_dirs = {
        "opt/stardust": "0o755",
        "opt/stardust/models": "0o750",
        "etc/stardust": "0o750",
        "var/lib/stardust": "0o750",
        "var/log/stardust": "0o750",
        "etc/systemd/system": "0o755",
        "etc/logrotate.d": "0o755",
    }
    for rel, m in expected_dirs.items():
        assert (root / rel).is_dir(), rel
        assert mode(root / rel) == m, rel
    expected_files = {
        "etc/stardust/node.yaml": ("0o640", REPO / "config" / "node.yaml"),
        "etc/stardust/rules.yaml": ("0o640", REPO / "config" / "rules.yaml"),
        "etc/systemd/system/stardust-node.service": ("0o644", UNIT),
        "etc/logrotate.d/stardust-node": ("0o644", REPO / "deploy" / "logrotate.conf"),
        "opt/stardust/README.md": ("0o644", REPO / "README.md"),
    }
    for rel, (m, source) in expected_files.items():
        assert mode(root / rel) == m, rel
        # default paths: the installed files are the shipped ones
        assert (root / rel).read_bytes() == source.read_bytes(), rel
    assert not (root / "opt/stardust/venv").exists()  # --skip-venv
    assert not (root / "etc/systemd/system/stardust-node.service.d").exists()  # no --port-104

    before = snapshot(root)
    second = install("--root", str(root), "--skip-venv")
    assert "nothing to change: the installation is up to date" in second.stdout
    assert snapshot(root) == before


def test_existing_configuration_is_never_overwritten(tmp_path):
    root = tmp_path / "root"
    install("--root", str(root), "--skip-venv")
    node_yaml = root / "etc/stardust/node.yaml"
    edited = node_yaml.read_text() + "\n# edited by the hospital\n"
    node_yaml.write_text(edited)
    (root / "etc/stardust/rules.yaml").unlink()  # a removed file is restored

    out = install("--root", str(root), "--skip-venv").stdout
    assert node_yaml.read_text() == edited
    assert f"keeping {node_yaml} (never overwritten); the shipped default is {node_yaml}.dist" in out
    dist = root / "etc/stardust/node.yaml.dist"
    assert dist.read_bytes() == (REPO / "config/node.yaml").read_bytes() and mode(dist) == "0o640"
    assert (root / "etc/stardust/rules.yaml").read_bytes() == (REPO / "config/rules.yaml").read_bytes()

    before = snapshot(root)
    assert "nothing to change" in install("--root", str(root), "--skip-venv").stdout
    assert snapshot(root) == before

    # going back to the default removes the now pointless .dist file
    shutil.copy(dist, node_yaml)
    out = install("--root", str(root), "--skip-venv").stdout
    assert not dist.exists() and "remove" in out


def test_a_changed_mode_or_unit_is_repaired_and_dry_run_changes_nothing(tmp_path):
    root = tmp_path / "root"
    install("--root", str(root), "--skip-venv")
    (root / "var/lib/stardust").chmod(0o777)
    unit = root / "etc/systemd/system/stardust-node.service"
    unit.write_text(unit.read_text().replace("NoNewPrivileges=yes", "NoNewPrivileges=no"))

    before = snapshot(root)
    dry = install("--root", str(root), "--skip-venv", "--dry-run").stdout
    assert f"would chmod 0750 {root}/var/lib/stardust" in dry
    assert f"would update {unit}" in dry
    assert "dry run: 2 change(s) would be made" in dry
    assert snapshot(root) == before

    install("--root", str(root), "--skip-venv")
    assert mode(root / "var/lib/stardust") == "0o750"
    assert unit.read_bytes() == UNIT.read_bytes()

    fresh = tmp_path / "never"
    install("--root", str(fresh), "--skip-venv", "--dry-run")
    assert not fresh.exists()


def test_custom_paths_and_user_are_written_into_the_unit_and_config(tmp_path):
    root = tmp_path / "root"
    install(
        "--root",
        str(root),
        "--skip-venv",
        "--prefix",
        "/srv/stardust",
        "--confdir",
        "/srv/stardust/etc",
        "--datadir",
        "/data/stardust",
        "--logdir",
        "/data/log",
        "--user",
        "dicomnode",
        "--port-104",
    )
    unit = (root / "etc/systemd/system/stardust-node.service").read_text()
    s = unit_settings(unit)
    assert s["ExecStart"] == ["/srv/stardust/venv/bin/dicom-node serve -c /srv/stardust/etc/node.yaml"]
    assert s["User"] == ["dicomnode"] and s["Group"] == ["dicomnode"]
    assert s["ReadWritePaths"] == ["/data/stardust /data/log"]
    assert s["WorkingDirectory"] == ["/data/stardust"]
    assert "/var/lib/stardust" not in unit and "/opt/stardust" not in unit
    node_yaml = (root / "srv/stardust/etc/node.yaml").read_text()
    assert re.search(r"^data_dir: /data/stardust$", node_yaml, re.M)
    assert (root / "data/stardust").is_dir() and (root / "data/log").is_dir()
    dropin = root / "etc/systemd/system/stardust-node.service.d/port-104.conf"
    assert unit_settings(dropin.read_text())["AmbientCapabilities"] == ["CAP_NET_BIND_SERVICE"]
    logrotate = (root / "etc/logrotate.d/stardust-node").read_text()
    assert "/data/log/*.log {" in logrotate and "su dicomnode dicomnode" in logrotate


@pytest.mark.parametrize(
    "args, message",
    [
        (["--prefix", "opt/stardust"], "--prefix must be an absolute path"),
        (["--datadir", "/data/my data"], "DATADIR must not contain spaces"),
        (["--user", "Bad User"], "--user 'Bad User' is not a valid user name"),
        (["--frobnicate"], "unknown option: --frobnicate"),
        (["--prefix"], "--prefix needs a value"),
        (["--wheelhouse", "/nonexistent/wheels"], "--wheelhouse /nonexistent/wheels is not a folder"),
    ],
)
def test_bad_options_are_refused(tmp_path, args, message):
    proc = install("--root", str(tmp_path / "root"), "--skip-venv", *args, check=False)
    assert proc.returncode == 2
    assert message in proc.stderr
    assert not (tmp_path / "root" / "etc").exists()


# --------------------------------------------------------------------------------------
def test_unit_has_the_required_hardening():
    s = unit_settings(UNIT.read_text())
    required = {
        "User": "stardust",
        "Group": "stardust",
        "Restart": "on-failure",
        "ProtectSystem": "strict",
        "NoNewPrivileges": "yes",
        "PrivateTmp": "yes",
        "ProtectHome": "yes",
        "CapabilityBoundingSet": "",
        "AmbientCapabilities": "",
        "UMask": "0027",
        "ProtectKernelTunables": "yes",
        "ProtectKernelModules": "yes",
        "ProtectKernelLogs": "yes",
        "ProtectControlGroups": "yes",
        "RestrictAddressFamilies": "AF_INET AF_INET6 AF_UNIX",
        "PrivateDevices": "no",  # yes would hide /dev/nvidia*
        "ReadWritePaths": "/var/lib/stardust /var/log/stardust",
        "ExecStart": "/opt/stardust/venv/bin/dicom-node serve -c /etc/stardust/node.yaml",
    }
    for key, value in required.items():
        assert s.get(key) == [value], key
    assert int(s["LimitNOFILE"][0]) >= 4096
    # settings that would hide /dev/nvidia* from the worker (ProtectClock implies
    # DeviceAllow=char-rtc before systemd 252, and any DeviceAllow closes the policy)
    for key in ("ProtectClock", "DeviceAllow", "DevicePolicy"):
        assert key not in s, key


def _verify_env(tmp_path: Path, port_104: bool) -> tuple[Path, dict]:
    """Stage an install and make its unit verifiable without the real venv."""
    root = tmp_path / "root"
    args = ["--root", str(root), "--skip-venv"] + (["--port-104"] if port_104 else [])
    install(*args)
    exe = root / "opt/stardust/venv/bin/dicom-node"
    exe.parent.mkdir(parents=True)
    exe.write_text("#!/bin/sh\nexit 0\n")
    exe.chmod(0o755)
    unit = root / "etc/systemd/system/stardust-node.service"
    unit.write_text(unit.read_text().replace("ExecStart=/opt/stardust", f"ExecStart={root}/opt/stardust"))
    env = dict(os.environ, SYSTEMD_UNIT_PATH=f"{root}/etc/systemd/system:", SYSTEMD_LOG_COLOR="0")
    return root, env


@pytest.mark.parametrize("port_104", [False, True])
def test_systemd_analyze_verify_accepts_the_installed_unit(tmp_path, port_104):
    tool = shutil.which("systemd-analyze")
    if tool is None:
        pytest.skip("systemd-analyze not found: install it with 'sudo apt-get install systemd'")
    root, env = _verify_env(tmp_path, port_104)
    proc = subprocess.run([tool, "verify", "stardust-node.service"], env=env, capture_output=True, text=True)
    # verify reports unknown keys and bad values on stderr without failing: demand silence
    assert proc.returncode == 0 and proc.stdout == "" and proc.stderr == "", proc.stdout + proc.stderr

    # and it does complain about a broken unit (so the silence above means something)
    unit = root / "etc/systemd/system/stardust-node.service"
    unit.write_text(unit.read_text().replace("ProtectHostname=yes", "ProtectHostnam=yes"))
    proc = subprocess.run([tool, "verify", "stardust-node.service"], env=env, capture_output=True, text=True)
    assert "Unknown key" in proc.stderr and "ProtectHostnam" in proc.stderr


def test_systemd_security_exposure_is_low(tmp_path):
    tool = shutil.which("systemd-analyze")
    if tool is None:
        pytest.skip("systemd-analyze not found: install it with 'sudo apt-get install systemd'")
    _, env = _verify_env(tmp_path, port_104=False)
    proc = subprocess.run(
        [tool, "security", "--offline=yes", "--no-pager", "stardust-node.service"],
        env=env,
        capture_output=True,
        text=True,
    )
    m = re.search(r"Overall exposure level for stardust-node\.service: ([0-9.]+)", proc.stdout)
    assert m, proc.stdout + proc.stderr
    exposure = float(m.group(1))
    print(f"systemd-analyze security exposure: {exposure}")
    # 10 is an unhardened service; the GPU (no PrivateDevices), the network and the
    # PyTorch JIT (no MemoryDenyWriteExecute) keep it from reaching ~1.
    assert exposure <= 3.0


def test_the_installed_default_configuration_passes_config_check(tmp_path, capsys):
    # node.yaml + rules.yaml as install.sh lays them out: rules found relative to the
    # config folder, every destination a rule names defined, data_dir rewritten
    from dicom_node.cli import main

    root = tmp_path / "root"
    data = tmp_path / "data"
    install("--root", str(root), "--skip-venv", "--datadir", str(data))
    config = root / "etc/stardust/node.yaml"
    rc = main(["config", "check", str(config)])
    out, err = capsys.readouterr()
    assert rc == 0, out + err
    assert f"data in {data}" in out and f"rules {root}/etc/stardust/rules.yaml" in out

    rules = root / "etc/stardust/rules.yaml"
    rules.write_text(rules.read_text().replace("destinations: [tps]", "destinations: [archive]"))
    rc = main(["config", "check", str(config)])
    out, err = capsys.readouterr()
    assert rc != 0
    assert "destination 'archive' is not defined in the node configuration (defined: tps)" in out + err


# -- the worker host's unit (dicom-node worker) ------------------------------------------
WORKER_UNIT = REPO / "deploy" / "stardust-worker.service"


def test_worker_unit_has_the_node_units_hardening_and_opens_no_port():
    node, worker = unit_settings(UNIT.read_text()), unit_settings(WORKER_UNIT.read_text())
    assert worker["ExecStart"] == ["/opt/stardust/venv/bin/dicom-node worker -c /etc/stardust/node.yaml"]
    assert worker["SocketBindDeny"] == ["any"]  # nothing listens on a worker host
    assert worker["KillMode"] == ["mixed"]  # SIGTERM to dicom-node worker, which stops its workers
    assert float(worker["TimeoutStopSec"][0]) > 60  # more than dicom-node worker's default --stop-timeout
    assert worker["RequiresMountsFor"] == ["/var/lib/stardust"]
    # every other setting of the node's unit is the same (the hardening test above covers those)
    differ = {"ExecStart", "Description", "TimeoutStopSec"}
    for key, values in node.items():
        if key not in differ:
            assert worker.get(key) == values, key
    for key in ("ProtectClock", "DeviceAllow", "DevicePolicy"):
        assert key not in worker, key


def test_staged_worker_host_install_lays_out_the_worker_unit(tmp_path):
    root = tmp_path / "root"
    out = install("--root", str(root), "--skip-venv", "--worker-host", "--datadir", "/data/stardust").stdout
    unit = root / "etc/systemd/system/stardust-worker.service"
    assert mode(unit) == "0o644"
    s = unit_settings(unit.read_text())
    assert s["ExecStart"] == ["/opt/stardust/venv/bin/dicom-node worker -c /etc/stardust/node.yaml"]
    assert s["ReadWritePaths"] == ["/data/stardust /var/log/stardust"]
    assert s["RequiresMountsFor"] == ["/data/stardust"]
    assert not (root / "etc/systemd/system/stardust-node.service").exists()
    assert "systemctl enable --now stardust-worker.service" in out
    assert (
        "nothing to change"
        in install("--root", str(root), "--skip-venv", "--worker-host", "--datadir", "/data/stardust").stdout
    )
    refused = install("--root", str(tmp_path / "other"), "--skip-venv", "--worker-host", "--port-104", check=False)
    assert refused.returncode == 2 and "a --worker-host opens no port" in refused.stderr


def test_systemd_analyze_verify_accepts_the_worker_unit(tmp_path):
    tool = shutil.which("systemd-analyze")
    if tool is None:
        pytest.skip("systemd-analyze not found: install it with 'sudo apt-get install systemd'")
    root = tmp_path / "root"
    install("--root", str(root), "--skip-venv", "--worker-host")
    exe = root / "opt/stardust/venv/bin/dicom-node"
    exe.parent.mkdir(parents=True)
    exe.write_text("#!/bin/sh\nexit 0\n")
    exe.chmod(0o755)
    unit = root / "etc/systemd/system/stardust-worker.service"
    unit.write_text(unit.read_text().replace("ExecStart=/opt/stardust", f"ExecStart={root}/opt/stardust"))
    env = dict(os.environ, SYSTEMD_UNIT_PATH=f"{root}/etc/systemd/system:", SYSTEMD_LOG_COLOR="0")
    proc = subprocess.run([tool, "verify", "stardust-worker.service"], env=env, capture_output=True, text=True)
    assert proc.returncode == 0 and proc.stdout == "" and proc.stderr == "", proc.stdout + proc.stderr
    proc = subprocess.run(
        [tool, "security", "--offline=yes", "--no-pager", "stardust-worker.service"],
        env=env,
        capture_output=True,
        text=True,
    )
    m = re.search(r"Overall exposure level for stardust-worker\.service: ([0-9.]+)", proc.stdout)
    assert m, proc.stdout + proc.stderr
    print(f"systemd-analyze security exposure (worker): {m.group(1)}")
    assert float(m.group(1)) <= 3.0
