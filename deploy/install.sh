#!/usr/bin/env bash
# Install (or upgrade) the STARDUST DICOM node as a systemd service.
#
#   sudo deploy/install.sh                 # install or upgrade from this checkout
#   sudo deploy/install.sh --dry-run       # say what would change, change nothing
#   deploy/install.sh --root /tmp/stage --skip-venv   # stage into a folder (packaging, tests)
#   sudo deploy/install.sh --worker-host   # a GPU host of several: stardust-worker.service
#
# What it does, each step only when something differs (running it twice changes nothing):
#   1. system user and group `stardust` (no login shell, home = the data directory),
#      added to the groups video/render where they exist (GPU device access);
#   2. directories: PREFIX (root, 0755), PREFIX/models (root:stardust, 0750), CONFDIR
#      (root:stardust, 0750), DATADIR and LOGDIR (stardust:stardust, 0750);
#   3. a virtual environment PREFIX/venv with PyTorch, SAM2 and this package (from PyPI,
#      or offline from --wheelhouse DIR);
#   4. CONFDIR/node.yaml and CONFDIR/rules.yaml from config/ (root:stardust, 0640) ONLY IF
#      ABSENT: an existing configuration is never overwritten; when the shipped default
#      differs, it is put beside it as node.yaml.dist / rules.yaml.dist for comparison;
#   5. the systemd unit /etc/systemd/system/stardust-node.service (and with --port-104
#      the drop-in granting CAP_NET_BIND_SERVICE), the logrotate file, then
#      `systemctl daemon-reload` when a unit file changed. With --worker-host the unit is
#      stardust-worker.service (`dicom-node worker`, README "Several hosts") instead.
# It never starts, stops or enables the service; it prints the commands for that.
set -euo pipefail

PREFIX=/opt/stardust
CONFDIR=/etc/stardust
DATADIR=/var/lib/stardust
LOGDIR=/var/log/stardust
SERVICE_USER=stardust
ROOT=""
DRY_RUN=0
SKIP_VENV=0
PORT_104=0
WORKER_HOST=0
WHEELHOUSE=""
PYTHON=${PYTHON:-python3}

SRC=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
UNIT_NAME=stardust-node.service

usage() {
    cat <<EOF
usage: $0 [options]

Install or upgrade the STARDUST DICOM node as the systemd service ${UNIT_NAME}.

options:
  --prefix DIR      code, venv and models (default ${PREFIX})
  --confdir DIR     configuration (default ${CONFDIR})
  --datadir DIR     received images, database, results, audit file (default ${DATADIR})
  --logdir DIR      log files, when logging.file is set in node.yaml (default ${LOGDIR})
  --user NAME       service user and group (default ${SERVICE_USER})
  --root DIR        install below DIR instead of / (staging, packaging, tests): no user
                    is created, ownership is not changed, systemctl is not called
  --dry-run         print what would be done and change nothing
  --skip-venv       do not create or update PREFIX/venv
  --wheelhouse DIR  install Python packages offline from DIR (pip --no-index)
  --port-104        allow the service to listen on port 104 (adds CAP_NET_BIND_SERVICE)
  --worker-host     a GPU host of a deployment on several hosts: install
                    stardust-worker.service (dicom-node worker: inference workers only)
                    instead of stardust-node.service
  -h, --help        this text
EOF
}

die() { echo "install.sh: error: $*" >&2; exit 2; }

need_value() {
    if [ $# -lt 2 ] || [ -z "$2" ]; then die "$1 needs a value"; fi
}

while [ $# -gt 0 ]; do
    case "$1" in
        --prefix) need_value "$@"; PREFIX=$2; shift 2 ;;
        --confdir) need_value "$@"; CONFDIR=$2; shift 2 ;;
        --datadir) need_value "$@"; DATADIR=$2; shift 2 ;;
        --logdir) need_value "$@"; LOGDIR=$2; shift 2 ;;
        --user) need_value "$@"; SERVICE_USER=$2; shift 2 ;;
        --root) need_value "$@"; ROOT=$2; shift 2 ;;
        --wheelhouse) need_value "$@"; WHEELHOUSE=$2; shift 2 ;;
        --dry-run) DRY_RUN=1; shift ;;
        --skip-venv) SKIP_VENV=1; shift ;;
        --port-104) PORT_104=1; shift ;;
        --worker-host) WORKER_HOST=1; shift ;;
        -h|--help) usage; exit 0 ;;
        *) usage >&2; die "unknown option: $1" ;;
    esac
done

for var in PREFIX CONFDIR DATADIR LOGDIR; do
    case "${!var}" in
        /*) ;;
        *) die "--$(echo "$var" | tr '[:upper:]' '[:lower:]') must be an absolute path (got '${!var}')" ;;
    esac
    case "${!var}" in
        *[[:space:]\#\&\|\\]*) die "${var} must not contain spaces or the characters # & | \\ (got '${!var}')" ;;
    esac
done
if [ "$WORKER_HOST" = 1 ]; then
    [ "$PORT_104" = 0 ] || die "--port-104 is for the DICOM listener: a --worker-host opens no port"
    UNIT_NAME=stardust-worker.service
fi
[[ "$SERVICE_USER" =~ ^[a-z_][a-z0-9_-]*$ ]] || die "--user '$SERVICE_USER' is not a valid user name"
if [ -n "$ROOT" ]; then
    case "$ROOT" in /*) ;; *) ROOT=$PWD/$ROOT ;; esac
    ROOT=${ROOT%/}
fi
[ -z "$WHEELHOUSE" ] || [ -d "$WHEELHOUSE" ] || die "--wheelhouse $WHEELHOUSE is not a folder"
if [ -z "$ROOT" ] && [ "$DRY_RUN" = 0 ] && [ "$(id -u)" != 0 ]; then
    die "run as root (sudo $0), or use --dry-run, or --root DIR to stage into a folder"
fi
for f in deploy/stardust-node.service deploy/stardust-worker.service deploy/port-104.conf deploy/logrotate.conf config/node.yaml config/rules.yaml; do
    [ -f "$SRC/$f" ] || die "$SRC/$f is missing: run this script from a complete checkout"
done

LIVE=0                       # changing the running system (users, ownership, systemctl)
[ -z "$ROOT" ] && LIVE=1
CHANGES=0
UNITS_CHANGED=0
TMP=$(mktemp -d)
trap 'rm -rf "$TMP"' EXIT

say() { echo "  $*"; }
act() {
    # act DESCRIPTION COMMAND...: run the command (or only describe it with --dry-run)
    local what=$1; shift
    CHANGES=$((CHANGES + 1))
    if [ "$DRY_RUN" = 1 ]; then
        say "would $what"
    else
        say "$what"
        "$@"
    fi
}

# owner_ok PATH USER GROUP: true when ownership matches (always true when not live)
owner_ok() {
    [ "$LIVE" = 1 ] || return 0
    [ "$(stat -c %U:%G "$1")" = "$2:$3" ]
}

set_owner() {
    [ "$LIVE" = 1 ] || return 0
    if [ "$DRY_RUN" = 1 ] && ! id "$2" >/dev/null 2>&1; then
        return 0
    fi
    owner_ok "$1" "$2" "$3" || act "chown $2:$3 $1" chown "$2:$3" "$1"
}

# ensure_dir DIR MODE USER GROUP
ensure_dir() {
    local dir=$ROOT$1 mode=$2 user=$3 group=$4
    if [ ! -d "$dir" ]; then
        act "create $dir ($mode $user:$group)" install -d -m "$mode" "$dir"
    elif [ "$(stat -c %a "$dir")" != "${mode#0}" ]; then
        act "chmod $mode $dir" chmod "$mode" "$dir"
    fi
    [ -d "$dir" ] && set_owner "$dir" "$user" "$group"
    return 0
}

# ensure_file SOURCE DEST MODE USER GROUP: install SOURCE as DEST when content or mode differ
ensure_file() {
    local src=$1 dest=$ROOT$2 mode=$3 user=$4 group=$5
    if [ -f "$dest" ] && cmp -s "$src" "$dest"; then
        if [ "$(stat -c %a "$dest")" != "${mode#0}" ]; then
            act "chmod $mode $dest" chmod "$mode" "$dest"
        fi
    else
        local verb=install
        [ -f "$dest" ] && verb=update
        act "$verb $dest" install -m "$mode" "$src" "$dest"
        case "$dest" in *.service|*.conf) UNITS_CHANGED=1 ;; esac
    fi
    [ -f "$dest" ] && set_owner "$dest" "$user" "$group"
    return 0
}

# ensure_config SOURCE DEST: copy a default configuration file unless DEST exists
ensure_config() {
    local src=$1 dest=$2
    if [ ! -e "$ROOT$dest" ]; then
        ensure_file "$src" "$dest" 0640 root "$SERVICE_USER"
    elif cmp -s "$src" "$ROOT$dest"; then
        say "$ROOT$dest is the shipped default"
        if [ -e "$ROOT$dest.dist" ]; then
            act "remove $ROOT$dest.dist (the same as the configuration)" rm -f "$ROOT$dest.dist"
        fi
    else
        say "keeping $ROOT$dest (never overwritten); the shipped default is $ROOT$dest.dist"
        ensure_file "$src" "$dest.dist" 0640 root "$SERVICE_USER"
    fi
}

# render SOURCE OUT: the shipped file with the default paths replaced by the chosen ones
render() {
    sed -e "s#/opt/stardust#${PREFIX}#g" \
        -e "s#/etc/stardust#${CONFDIR}#g" \
        -e "s#/var/lib/stardust#${DATADIR}#g" \
        -e "s#/var/log/stardust#${LOGDIR}#g" \
        -e "s#^User=stardust\$#User=${SERVICE_USER}#" \
        -e "s#^Group=stardust\$#Group=${SERVICE_USER}#" \
        -e "s#^\\([[:space:]]*su\\) stardust stardust\$#\\1 ${SERVICE_USER} ${SERVICE_USER}#" \
        "$1" > "$2"
}

echo "STARDUST DICOM node: installing from $SRC${ROOT:+ into $ROOT}$([ "$DRY_RUN" = 1 ] && echo ' (dry run)')"

# -- 1. user ----------------------------------------------------------------------------
echo "user:"
if [ "$LIVE" = 0 ]; then
    say "--root: not creating the user '$SERVICE_USER' and not changing ownership"
elif id "$SERVICE_USER" >/dev/null 2>&1; then
    say "user $SERVICE_USER exists"
else
    act "create system user $SERVICE_USER" useradd --system --user-group --home-dir "$DATADIR" \
        --no-create-home --shell /usr/sbin/nologin --comment "STARDUST DICOM node" "$SERVICE_USER"
fi
if [ "$LIVE" = 1 ]; then
    for group in video render; do
        if getent group "$group" >/dev/null && ! id -nG "$SERVICE_USER" 2>/dev/null | tr ' ' '\n' | grep -qx "$group"; then
            act "add $SERVICE_USER to group $group (GPU device access)" usermod -a -G "$group" "$SERVICE_USER"
        fi
    done
fi

# -- 2. directories ---------------------------------------------------------------------
echo "directories:"
ensure_dir "$PREFIX" 0755 root root
ensure_dir "$PREFIX/models" 0750 root "$SERVICE_USER"
ensure_dir "$CONFDIR" 0750 root "$SERVICE_USER"
ensure_dir "$DATADIR" 0750 "$SERVICE_USER" "$SERVICE_USER"
ensure_dir "$LOGDIR" 0750 "$SERVICE_USER" "$SERVICE_USER"
for d in /etc/systemd/system /etc/logrotate.d; do
    ensure_dir "$d" 0755 root root
done

# -- 3. virtual environment -------------------------------------------------------------
echo "python environment:"
VENV=$PREFIX/venv
if [ "$SKIP_VENV" = 1 ]; then
    say "--skip-venv: not touching $ROOT$VENV"
else
    # The same pins as the Makefile (torch first, then sam2 without build isolation).
    TORCH=${TORCH:-$(sed -n 's/^TORCH *?= *//p' "$SRC/Makefile")}
    SAM2=${SAM2:-$(sed -n 's/^SAM2 *?= *//p' "$SRC/Makefile")}
    if [ -z "$TORCH" ] || [ -z "$SAM2" ]; then die "cannot read the TORCH/SAM2 pins from $SRC/Makefile"; fi
    # What the venv was built from: the pins and the content of the package sources.
    STAMP=$ROOT$VENV/.stardust-installed
    WANT=$( { echo "$TORCH $SAM2"; cd "$SRC" && find pyproject.toml dicom_node inference rtstruct -type f \
              ! -name '*.pyc' -print0 | sort -z | xargs -0 sha256sum; } | sha256sum | cut -d' ' -f1)
    if [ -f "$STAMP" ] && [ "$(cat "$STAMP")" = "$WANT" ] && [ -x "$ROOT$VENV/bin/dicom-node" ]; then
        say "$ROOT$VENV is up to date"
    else
        PIP_OPTS=(--quiet --disable-pip-version-check)
        [ -z "$WHEELHOUSE" ] || PIP_OPTS+=(--no-index --find-links "$WHEELHOUSE")
        if [ ! -x "$ROOT$VENV/bin/python" ]; then
            act "create $ROOT$VENV" "$PYTHON" -m venv "$ROOT$VENV"
        fi
        # shellcheck disable=SC2086  # TORCH holds several requirement specifiers
        act "install $TORCH" "$ROOT$VENV/bin/python" -m pip install "${PIP_OPTS[@]}" $TORCH
        act "install $SAM2" env SAM2_BUILD_CUDA=0 "$ROOT$VENV/bin/python" -m pip install "${PIP_OPTS[@]}" \
            --no-build-isolation "$SAM2"
        act "install the node's dependencies" "$ROOT$VENV/bin/python" -m pip install "${PIP_OPTS[@]}" "$SRC"
        # The same version number may carry new code: always replace the package itself.
        act "install the node from $SRC" "$ROOT$VENV/bin/python" -m pip install "${PIP_OPTS[@]}" \
            --force-reinstall --no-deps "$SRC"
        [ "$DRY_RUN" = 1 ] || echo "$WANT" > "$STAMP"
    fi
fi
ensure_file "$SRC/README.md" "$PREFIX/README.md" 0644 root root

# -- 4. configuration -------------------------------------------------------------------
echo "configuration:"
# The shipped node.yaml with data_dir pointing at DATADIR (a no-op for the default).
sed -e "s#^data_dir:.*#data_dir: ${DATADIR}#" "$SRC/config/node.yaml" > "$TMP/node.yaml"
ensure_config "$TMP/node.yaml" "$CONFDIR/node.yaml"
ensure_config "$SRC/config/rules.yaml" "$CONFDIR/rules.yaml"

# -- 5. systemd and logrotate -----------------------------------------------------------
echo "systemd and logrotate:"
render "$SRC/deploy/$UNIT_NAME" "$TMP/$UNIT_NAME"
ensure_file "$TMP/$UNIT_NAME" "/etc/systemd/system/$UNIT_NAME" 0644 root root
DROPIN_DIR=/etc/systemd/system/$UNIT_NAME.d
if [ "$PORT_104" = 1 ]; then
    ensure_dir "$DROPIN_DIR" 0755 root root
    ensure_file "$SRC/deploy/port-104.conf" "$DROPIN_DIR/port-104.conf" 0644 root root
elif [ -f "$ROOT$DROPIN_DIR/port-104.conf" ]; then
    say "keeping $ROOT$DROPIN_DIR/port-104.conf (installed earlier with --port-104; remove it by hand if unwanted)"
fi
render "$SRC/deploy/logrotate.conf" "$TMP/logrotate"
ensure_file "$TMP/logrotate" /etc/logrotate.d/stardust-node 0644 root root

if [ "$UNITS_CHANGED" = 1 ]; then
    if [ "$LIVE" = 1 ] && [ -d /run/systemd/system ]; then
        act "reload systemd (systemctl daemon-reload)" systemctl daemon-reload
    else
        say "systemd is not running here: run 'systemctl daemon-reload' on the target system"
    fi
fi

echo
if [ "$CHANGES" = 0 ]; then
    echo "nothing to change: the installation is up to date"
elif [ "$DRY_RUN" = 1 ]; then
    echo "dry run: $CHANGES change(s) would be made"
else
    echo "$CHANGES change(s) made"
fi
cat <<EOF
next steps:
EOF
if [ "$WORKER_HOST" = 1 ]; then
    cat <<EOF
  edit $CONFDIR/node.yaml as on the serve host (database, data_dir and shared store, rules,
  workers.devices); add the shared mount to the unit: systemctl edit $UNIT_NAME
EOF
else
    cat <<EOF
  edit $CONFDIR/node.yaml (AE title, port, allowed TPS AE titles and networks, destinations)
EOF
fi
cat <<EOF
  $VENV/bin/dicom-node config check $CONFDIR/node.yaml
  systemctl enable --now $UNIT_NAME      # first install
  systemctl restart $UNIT_NAME           # after an upgrade
  journalctl -u $UNIT_NAME -f
EOF
