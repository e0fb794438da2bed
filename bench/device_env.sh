# Sourced by the bench scripts that run on the device machine (gpu_learn.sh, quickstart_sweep.sh): where the
# kit is not installed, the wheels in .whl/ go to /tmp/site; the repo goes on PYTHONPATH, the hub stays off.
if [ -d .whl ] && ! python3 -c "import peft, sqlite_utils, xgrammar" 2>/dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl
  export PYTHONPATH=/tmp/site
fi
export PYTHONPATH="${PYTHONPATH:+$PYTHONPATH:}$(pwd)" HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1 TRANSFORMERS_VERBOSITY=error
