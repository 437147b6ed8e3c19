#!/usr/bin/env bash
# Build the bamcount applet's resources: the bamcountd wheel, installed with its dependencies
# (pure Python: anyio, structlog, …) into resources/opt/bamcountd/lib, which the worker
# unpacks at /opt/bamcountd/lib; src/bamcount.py puts that folder first on sys.path, so the
# job needs neither pip nor network.  dxpy and samtools come from the platform.  numpy is left
# out: only the interval sweep's reader imports it, and the applet counts whole references
# (it has no regions input), so a job never sweeps; and a wheel built here would be for this
# machine's Python, not the worker's.
#
#   dnanexus/build.sh                                 # resources only (no DNAnexus account needed)
#   dnanexus/build.sh --upload [dx build options…]    # then `dx build`, e.g. -d project-xxxx:/applets/
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
root="$(cd "$here/.." && pwd)"
target="$here/bamcount/resources/opt/bamcountd"
python="${PYTHON:-python3}"
scratch="$(mktemp -d)"
trap 'rm -rf "$scratch"' EXIT

rm -rf "$target"
mkdir -p "$target"
"$python" -m pip wheel --quiet --no-deps --wheel-dir "$target" "$root"
"$python" -m pip install --quiet --target "$target/lib" "$target"/bamcountd-*.whl
rm -rf "$target/lib/bin" "$target/lib"/dxpy*  # dxpy is the platform's own
rm -rf "$target/lib"/numpy "$target/lib"/numpy-* "$target/lib"/numpy.libs  # see above
echo "bamcount resources:"
ls -1 "$target" "$target/lib"

if [ "${1:-}" = "--upload" ]; then
  shift
  command -v dx >/dev/null || { echo "dx (dx-toolkit) is not installed: pip install dxpy" >&2; exit 2; }
  dx build "$here/bamcount" "$@"
fi
