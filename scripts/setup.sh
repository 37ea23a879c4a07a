#!/usr/bin/env bash
# Installs what unionfs needs on a Debian machine and builds the venv in .venv.
# Idempotent and quick when everything is already there; sourced by scripts/demo
# and scripts/test, so each of those is the only command a fresh machine needs.
set -euo pipefail
top=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)

# The system interpreter, not a per-user one (pyenv under /root): the tests run the
# daemon as an unprivileged user too, and that user must be able to execute it.
PY=python3
[ -x /usr/bin/python3 ] && PY=/usr/bin/python3

need_apt=()
command -v fusermount3 >/dev/null || need_apt+=(fuse3)
pkg-config --exists fuse3 2>/dev/null || need_apt+=(libfuse3-dev pkg-config)
command -v setfattr >/dev/null || need_apt+=(attr)
command -v gcc >/dev/null || need_apt+=(gcc)
$PY -c 'import ensurepip, venv' 2>/dev/null || need_apt+=(python3-venv)
# Peers and programs the tests run against our output (OCI tools, namespaces, real programs).
for pair in umoci:umoci skopeo:skopeo newuidmap:uidmap debootstrap:debootstrap zstd:zstd \
    bwrap:bubblewrap fuse-overlayfs:fuse-overlayfs git:git sqlite3:sqlite3 setfacl:acl; do
  command -v "${pair%%:*}" >/dev/null || need_apt+=("${pair#*:}")
done
[ -e "$($PY -c 'import sysconfig; print(sysconfig.get_paths()["include"])')/Python.h" ] \
  || need_apt+=(python3-dev)
if [ ${#need_apt[@]} -gt 0 ]; then
  sudo=""; [ "$(id -u)" -eq 0 ] || sudo="sudo"
  echo "setup: installing ${need_apt[*]}" >&2
  $sudo apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq "${need_apt[@]}" >/dev/null
fi

venv="$top/.venv"
# The C helper is built at install time: a change to it re-installs too.
stamp="$venv/.installed-$( (cat "$top/pyproject.toml" "$top/setup.py" "$top"/unionfs/*.c "$top"/unionfs/*.h; echo "$PY") | sha1sum | cut -c1-12)"
if [ ! -e "$stamp" ]; then
  echo "setup: creating $venv" >&2
  rm -rf "$venv"
  # The helper is optional (setup.py): a build that fails would leave an earlier
  # build's module in the tree, and everything would run that stale C code.
  rm -f "$top"/unionfs/_dircache.*.so
  $PY -m venv "$venv"
  if ! "$venv/bin/pip" install -e "$top[test]" >"$venv/pip.log" 2>&1; then
    cat "$venv/pip.log" >&2; exit 1
  fi
  if ! "$venv/bin/python" -c "import unionfs._dircache" 2>/dev/null; then
    echo "setup: warning: the C session helper (unionfs/_dircache.c) did not build;" \
      "unionfs runs without it (see $venv/pip.log)" >&2
  fi
  touch "$stamp"
fi
export PATH="$venv/bin:$PATH"
