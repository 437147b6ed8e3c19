#!/usr/bin/env bash
# Bundle what benchmarks/bench_count.py needs on a machine with Python 3.12 but no samtools
# and no package index (the 16-core benchmark machine): samtools with its shared libraries,
# and wheels of bamcountd and its dependencies.  Then, on that machine, from the repo root:
#     bash benchmarks/bundle/run.sh [bench_count.py options]
set -euo pipefail
cd "$(dirname "$0")/.."
out=benchmarks/bundle
rm -rf "$out" && mkdir -p "$out/bin" "$out/lib" "$out/wheels"
samtools=$(command -v samtools)
cp "$samtools" "$out/bin/samtools"
# Every library samtools loads except the C library itself, which the other machine has.
ldd "$samtools" | awk '/=> \// {print $3}' | grep -v -E '/(libc|libm|libpthread|libdl|librt)\.so' |
    xargs -I{} cp -L {} "$out/lib/"
python=${PYTHON:-.venv/bin/python}
"$python" -m pip wheel -q --no-deps -w "$out/wheels" .
# The dependencies, at the versions installed here (numpy's wheel is the one for Python 3.12).
pins=$("$python" -m pip list --format=freeze 2>/dev/null | grep -i -E '^(anyio|structlog|idna|sniffio|typing.extensions|numpy)==')
# shellcheck disable=SC2086
"$python" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 -d "$out/wheels" $pins
cat > "$out/run.sh" <<'RUN'
#!/usr/bin/env bash
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
export PATH="$here/bin:$PATH" LD_LIBRARY_PATH="$here/lib"
site=$(mktemp -d)
python3 -m pip install -q --no-index --no-deps --target "$site" "$here"/wheels/*.whl
export PYTHONPATH="$site"
echo "# $(nproc) cores: $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | sed 's/^ *//'), $(free -g | awk '/Mem/ {print $2}') GiB"
echo "# $(python3 --version), $(samtools --version | head -1), bamcountd from $site"
python3 "$here/../bench_count.py" "$@"
RUN
chmod +x "$out/run.sh"
du -sh "$out"
