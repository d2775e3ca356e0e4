#!/usr/bin/env bash
# Download into .whl/ (at the repository root) the wheels kdcache needs that the GPU machines' image
# lacks, for its Python 3.12 on x86-64 Linux: zarr, numcodecs, google-crc32c and donfig (their other
# requirements, numpy, packaging, typing-extensions and pyyaml, are in the image). Run it here, where
# pip reaches PyPI; then send .whl with the run (the device tool's `carry`) and benchmarks/gpu_check.sh
# installs them there. Versions: those installed in this Python, else the pins below.
#
#   bash benchmarks/gpu_wheels.sh            # then: carry [".whl"], command: bash benchmarks/gpu_check.sh
set -euo pipefail

cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
DEST=.whl
declare -A PINS=([zarr]=3.1.6 [numcodecs]=0.16.6 [google-crc32c]=1.9.0 [donfig]=0.8.1.post1)

mkdir -p "$DEST"
specs=()
for name in zarr numcodecs google-crc32c donfig; do
    version=$("$PY" -c "import importlib.metadata as m, sys
try: print(m.version(sys.argv[1]))
except m.PackageNotFoundError: print('')" "$name")
    version=${version:-${PINS[$name]}}
    rm -f "$DEST/${name//-/_}"-*.whl  # one version of each: two stop the whole install
    specs+=("$name==$version")
done

platforms=()
for p in manylinux_2_28_x86_64 manylinux_2_27_x86_64 manylinux_2_24_x86_64 manylinux_2_17_x86_64 \
         manylinux2014_x86_64 manylinux1_x86_64; do
    platforms+=(--platform "$p")
done
"$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    "${platforms[@]}" -d "$DEST" "${specs[@]}"

grep -qxF '.whl/' .gitignore 2>/dev/null || echo '.whl/' >> .gitignore
ls -l "$DEST"
size=$(du -sk "$DEST" | cut -f1)
echo "gpu_wheels: ${specs[*]} in $DEST ($((size / 1024)) MiB; the working tree that travels is limited to 64 MiB)"
if [ "$size" -gt $((48 * 1024)) ]; then
    echo "gpu_wheels: $DEST is over 48 MiB; remove what the GPU image already has" >&2
    exit 1
fi
