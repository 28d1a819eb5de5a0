#!/usr/bin/env python3
# Compiles the CUDA kernels (crates/smoe/src/compute/cuda/*.cu, in the order
# and with the options load.rs gives NVRTC) where there is no GPU, to catch
# compile errors and read register and spill counts before a GPU machine is
# used. Needs libnvrtc: `pip download nvidia-cuda-nvrtc` and unzip, then
# NVRTC=path/to/libnvrtc.so.13 tools/nvrtc-check.py [sm_90].
import ctypes, os, sys
here = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "crates/smoe/src/compute/cuda")
src = "".join(open(os.path.join(here, f)).read() + "\n"
              for f in ["common.cu", "matmul.cu", "ops.cu", "route.cu", "attention.cu"])
arch = sys.argv[1] if len(sys.argv) > 1 else "sm_90"
lib = ctypes.CDLL(os.environ.get("NVRTC", "libnvrtc.so.13"))
prog = ctypes.c_void_p()
assert lib.nvrtcCreateProgram(ctypes.byref(prog), src.encode(), b"smoe.cu", 0, None, None) == 0
opts = [f"--gpu-architecture={arch}".encode(), b"--std=c++17", b"-Xptxas=-v"]
rc = lib.nvrtcCompileProgram(prog, len(opts), (ctypes.c_char_p * len(opts))(*opts))
n = ctypes.c_size_t()
lib.nvrtcGetProgramLogSize(prog, ctypes.byref(n))
log = ctypes.create_string_buffer(n.value)
lib.nvrtcGetProgramLog(prog, log)
print(log.value.decode(errors="replace"))
print("compiled" if rc == 0 else f"FAILED ({rc})")
sys.exit(rc)
