# Source on an offline Linux machine (e.g. a GPU node with many cores) to run LIBERO from a bundle
# made here with `python -m tools.libero_bundle --out .bundle` (README: "LIBERO on an offline node"):
#     source scripts/libero_offline.sh [BUNDLE_DIR]     # default .bundle; run from the repo root
# Uses the machine's own python3 (which must have torch and numpy); installs nothing system-wide
# except the EGL loader packages (dpkg -x, as root), and leaves everything under /tmp/rsd_offline.
_b="${1:-.bundle}"
_d=/tmp/rsd_offline
if [ ! -f "$_b/MANIFEST.json" ]; then echo "libero_offline: no bundle at $_b (make one with tools.libero_bundle)" >&2; return 1; fi
mkdir -p "$_d/stubs"
if [ -d "$_b/gl" ] && [ "$(id -u)" = 0 ] && ! ldconfig -p | grep -q libEGL.so.1; then
    for f in "$_b"/gl/*.deb; do dpkg -x "$f" /; done; ldconfig
fi
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$_d/whl" "$_b"/whl/*.whl || return 1
[ -d "$_d/site" ] || tar xJf "$_b/site.tar.xz" -C "$_d" || return 1
for m in cv2 numba matplotlib; do
    if ! python3 -c "import $m" 2>/dev/null; then cp -r "$_b/stubs/$m" "$_d/stubs/"; echo "libero_offline: $m absent, using the bundle's stand-in" >&2; fi
done
export PYTHONPATH="$PWD:$_d/whl:$_d/site:$_d/stubs${PYTHONPATH:+:$PYTHONPATH}"
export MUJOCO_GL=egl PYOPENGL_PLATFORM=egl LIBERO_CONFIG_PATH="$_d/libero-config" TOKENIZERS_PARALLELISM=false
if [ -f /usr/local/nvidia/share/glvnd/egl_vendor.d/10_nvidia.json ]; then
    export __EGL_VENDOR_LIBRARY_FILENAMES=/usr/local/nvidia/share/glvnd/egl_vendor.d/10_nvidia.json
fi
python3 -m producer.libero_setup >/dev/null || return 1
