#!/usr/bin/env bash
# A private Docker engine for the container tests (tests/deploy/test_container.py) and for
# the image figures of docs/deployment.md, on a Debian bookworm machine without Docker Hub.
#
# The engine: Debian trixie's docker.io (26.1), docker-buildx and docker-compose (v2), and
# containerd, fetched with `apt-get download` under a private apt state and unpacked with
# `dpkg -x` beside the checkout (nothing of them is installed system-wide); bookworm's runc
# (trixie's needs glibc 2.38). dockerd runs with its own data and exec roots, --bridge=none
# and --iptables=false: containers run with --network host and builds with --network none,
# so nothing listens on or sends to anything but 127.0.0.1.
#
# The base: a STAND-IN for python:3.12.8-slim-bookworm (Docker Hub is unreachable here):
# `debootstrap --variant=minbase bookworm` from the mirror of the host's apt sources, with
# Debian's Python 3.11 and a venv at /usr/local (so `python` and `pip` are on PATH as in
# the real image), imported into the engine as $STAND_IN.
#
#   tools/docker_engine.sh install  apt packages (runc, debootstrap) + the engine (root)
#   tools/docker_engine.sh start    install, start dockerd unless it answers, the stand-in;
#                                   prints "started" (stop it later) or "running"
#   tools/docker_engine.sh env      KEY=VALUE lines: DOCKER_HOST, DOCKER_CONFIG, PATH, STAND_IN
#   tools/docker_engine.sh stop     stop the dockerd of this engine directory, by its PID
#
# Idempotent; each step bounded by a timeout. RESNET_SERVE_ENGINE_DIR (default
# .cache/engine in the checkout) holds the packages, the data root and the base's rootfs.
set -euo pipefail

ROOT=$(cd "$(dirname "$0")/.." && pwd)
ENGINE_DIR=${RESNET_SERVE_ENGINE_DIR:-$ROOT/.cache/engine}
PKG_ROOT=$ENGINE_DIR/root
# A short exec root: the sockets under it must fit in a unix socket path.
EXEC_ROOT=/run/resnet-serve-engine-$(printf %s "$ENGINE_DIR" | cksum | cut -d' ' -f1)
SOCK=$EXEC_ROOT/docker.sock
PIDFILE=$ENGINE_DIR/dockerd.pid
STAND_IN=stand-in/python:3.11-slim-bookworm
ENGINE_SUITE=trixie
ENGINE_PACKAGES=(docker.io docker-cli docker-buildx docker-compose containerd tini)

log() { printf 'docker_engine: %s\n' "$*" >&2; }

env_lines() {
  printf 'DOCKER_HOST=unix://%s\n' "$SOCK"
  printf 'DOCKER_CONFIG=%s\n' "$ENGINE_DIR/config"
  printf 'PATH=%s\n' "$PKG_ROOT/usr/bin:$PKG_ROOT/usr/sbin:$PATH"
  printf 'STAND_IN=%s\n' "$STAND_IN"
}

use_engine() {
  export DOCKER_HOST=unix://$SOCK DOCKER_CONFIG=$ENGINE_DIR/config
  export PATH=$PKG_ROOT/usr/bin:$PKG_ROOT/usr/sbin:$PATH
}

# The Debian mirror of the host's own apt sources (one-line or deb822), never a fixed host.
mirror() {
  python3 - <<'EOF'
import glob, re
codename = dict(
    line.rstrip().split("=", 1) for line in open("/etc/os-release") if "=" in line
)["VERSION_CODENAME"].strip('"')
files = ["/etc/apt/sources.list", *sorted(glob.glob("/etc/apt/sources.list.d/*"))]
for path in files:
    try:
        text = open(path).read()
    except OSError:
        continue
    if path.endswith(".sources"):
        for stanza in re.split(r"\n\s*\n", text):
            f = dict(re.findall(r"^([A-Za-z-]+):\s*(.*)$", stanza, re.M))
            if "deb" in f.get("Types", "").split() and codename in f.get("Suites", "").split():
                print(f["URIs"].split()[0].rstrip("/"))
                raise SystemExit
    else:
        for line in text.splitlines():
            words = re.sub(r"\[[^]]*\]", "", line.split("#")[0]).split()
            if len(words) >= 3 and words[0] == "deb" and words[2] == codename:
                print(words[1].rstrip("/"))
                raise SystemExit
raise SystemExit(f"no Debian {codename} mirror in the host's apt sources")
EOF
}

install() {
  [ "$(id -u)" -eq 0 ] || { log "install needs root (apt-get, dpkg -x, dockerd)"; exit 2; }
  local missing=()
  command -v runc >/dev/null 2>&1 || missing+=(runc)
  command -v debootstrap >/dev/null 2>&1 || missing+=(debootstrap)
  if [ "${#missing[@]}" -gt 0 ]; then
    log "apt-get install ${missing[*]}"
    timeout 600 apt-get update -qq
    DEBIAN_FRONTEND=noninteractive timeout 600 \
      apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
  fi
  [ -x "$PKG_ROOT/usr/sbin/dockerd" ] && return
  local apt=$ENGINE_DIR/apt url
  url=$(mirror)
  mkdir -p "$apt/state/lists/partial" "$apt/cache/archives/partial" "$apt/debs"
  printf 'deb [signed-by=/usr/share/keyrings/debian-archive-keyring.gpg] %s %s main\n' \
    "$url" "$ENGINE_SUITE" >"$apt/sources.list"
  local opts=(-o "Dir::State=$apt/state" -o "Dir::Cache=$apt/cache"
    -o "Dir::Etc::SourceList=$apt/sources.list" -o "Dir::Etc::SourceParts=/nonexistent"
    -o "APT::Sandbox::User=root")
  log "downloading ${ENGINE_PACKAGES[*]} ($ENGINE_SUITE, $url)"
  timeout 600 apt-get "${opts[@]}" update -qq
  (cd "$apt/debs" && timeout 600 apt-get "${opts[@]}" download -qq "${ENGINE_PACKAGES[@]}")
  local tmp
  tmp=$(mktemp -d "$ENGINE_DIR/.root.XXXXXX")
  for deb in "$apt"/debs/*.deb; do dpkg -x "$deb" "$tmp"; done
  # Complete or absent: a half-unpacked root is never taken for an engine.
  rm -rf "$PKG_ROOT" && mv "$tmp" "$PKG_ROOT"
  rm -rf "$apt"
}

answers() { timeout 10 docker version >/dev/null 2>&1; }

start_dockerd() {
  use_engine
  if answers; then
    echo running
    return
  fi
  mkdir -p "$ENGINE_DIR/data" "$ENGINE_DIR/config/cli-plugins" "$EXEC_ROOT"
  ln -sf "$PKG_ROOT"/usr/libexec/docker/cli-plugins/docker-* "$ENGINE_DIR/config/cli-plugins/"
  # Its own log, and no descriptor of the caller's: the caller may wait for EOF on them.
  # Its own session: it outlives the shell that started it, until `stop`.
  setsid nohup dockerd --data-root "$ENGINE_DIR/data" --exec-root "$EXEC_ROOT" \
    --pidfile "$PIDFILE" --host "unix://$SOCK" --bridge=none --iptables=false \
    --ip6tables=false --storage-driver overlay2 \
    </dev/null >>"$ENGINE_DIR/dockerd.log" 2>&1 &
  local deadline=$((SECONDS + 90))
  until answers; do
    if ! kill -0 $! 2>/dev/null || [ "$SECONDS" -ge "$deadline" ]; then
      log "dockerd did not answer on $SOCK; its log:"
      tail -n 30 "$ENGINE_DIR/dockerd.log" >&2
      kill $! 2>/dev/null || true
      exit 1
    fi
    sleep 1
  done
  echo started
}

stand_in() {
  use_engine
  docker image inspect "$STAND_IN" >/dev/null 2>&1 && return
  local tar=$ENGINE_DIR/bookworm-minbase.tar
  if [ ! -s "$tar" ]; then
    local rootfs url
    url=$(mirror)
    rootfs=$(mktemp -d "$ENGINE_DIR/.rootfs.XXXXXX")
    log "debootstrap bookworm ($url): the STAND-IN base"
    timeout 900 debootstrap --variant=minbase --include=python3-venv,ca-certificates \
      bookworm "$rootfs" "$url" >"$ENGINE_DIR/debootstrap.log" 2>&1 \
      || { tail -n 20 "$ENGINE_DIR/debootstrap.log" >&2; exit 1; }
    rm -rf "$rootfs"/var/cache/apt/archives/*.deb "$rootfs"/var/lib/apt/lists/*
    tar -C "$rootfs" -cf "$tar.tmp" . && mv "$tar.tmp" "$tar"
    rm -rf "$rootfs"
  fi
  timeout 300 docker import "$tar" stand-in/debian:bookworm-minbase >/dev/null
  local ctx
  ctx=$(mktemp -d)
  # This network intercepts TLS: the stand-in trusts the host's CA store.
  cp /etc/ssl/certs/ca-certificates.crt "$ctx/"
  cat >"$ctx/Dockerfile" <<'EOF'
FROM stand-in/debian:bookworm-minbase
LABEL org.opencontainers.image.description="STAND-IN for python:3.12.8-slim-bookworm: Debian bookworm's Python 3.11, a venv at /usr/local (tools/docker_engine.sh)"
COPY ca-certificates.crt /etc/ssl/certs/ca-certificates.crt
RUN python3 -m venv /usr/local
ENV LANG=C.UTF-8 PIP_CERT=/etc/ssl/certs/ca-certificates.crt
CMD ["python3"]
EOF
  log "building $STAND_IN (a STAND-IN, not the real python image)"
  timeout 300 docker build -q --network none -t "$STAND_IN" "$ctx" >/dev/null
  rm -rf "$ctx"
}

stop() {
  [ -s "$PIDFILE" ] || return 0  # none started from this engine directory
  local pid
  pid=$(cat "$PIDFILE")
  if kill -0 "$pid" 2>/dev/null; then
    kill -TERM "$pid"
    # dockerd stops its containers and its containerd before it exits.
    for _ in $(seq 60); do kill -0 "$pid" 2>/dev/null || break; sleep 0.5; done
    if kill -0 "$pid" 2>/dev/null; then
      log "dockerd $pid still running after 30 s: KILL"
      kill -KILL "$pid"
    fi
  fi
  rm -f "$PIDFILE"
}

case "${1:-}" in
  install) install ;;
  start) install && start_dockerd && stand_in ;;
  env) env_lines ;;
  stop) stop ;;
  *) echo "usage: $0 install|start|env|stop" >&2; exit 2 ;;
esac
