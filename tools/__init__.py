"""Developer tools: the GPU check kit (``tools/gpu_check.py``) and the kernel smoke run (``tools/kernel_smoke.py``).

Each runs as a script from the repository root (``python tools/<name>.py --help``); a regular package, so that
``from tools import gpu_check`` finds this folder rather than another ``tools`` on the path.
"""
