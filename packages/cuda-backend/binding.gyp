# The CUDA addon: native/*.cc (node-addon-api) + kernels/*.cu (nvcc, sm_90a).
#
# Kernels are compiled by scripts/build-kernels.mjs, one nvcc per file in parallel, into a static
# archive; the addon links it with cudart_static so that only the NVIDIA driver (libcuda.so.1) is
# needed at run time. --exclude-libs keeps cudart's symbols private to this addon.
{
  "variables": {
    "cuda_home%": "<!(node scripts/build-kernels.mjs --cuda-home)",
    "kernels_out": "<(module_root_dir)/build/kernels",
  },
  "targets": [
    {
      "target_name": "moeflash_kernels",
      "type": "none",
      "actions": [
        {
          "action_name": "nvcc_kernels",
          "inputs": ["<!@(ls kernels/*.cu kernels/*.cuh kernels/*.h)", "scripts/build-kernels.mjs"],
          # The stamp is never written, so make runs the script on every build; the script itself
          # recompiles only stale objects (headers included), which make's rule cannot see.
          "outputs": ["<(kernels_out)/libmoeflash_kernels.a", "<(kernels_out)/always-check"],
          "action": ["node", "scripts/build-kernels.mjs", "<(kernels_out)"],
          "message": "nvcc kernels/*.cu",
        }
      ],
    },
    {
      "target_name": "moeflash_cuda",
      "dependencies": ["moeflash_kernels"],
      "sources": ["<!@(ls native/*.cc)"],
      "include_dirs": [
        "<!(node -p \"require('node-addon-api').include_dir\")",
        "<(cuda_home)/include",
        "kernels",
      ],
      "defines": ["NAPI_VERSION=8", "NAPI_CPP_EXCEPTIONS"],
      "cflags!": ["-fno-exceptions"],
      "cflags_cc!": ["-fno-exceptions", "-fno-rtti", "-std=gnu++17", "-std=gnu++20"],
      "cflags_cc": ["-std=c++17", "-fexceptions", "-O2", "-Wall", "-Wno-unused-parameter"],
      "libraries": [
        "<(kernels_out)/libmoeflash_kernels.a",
        "-L<(cuda_home)/lib64",
        "-lcudart_static",
        "-ldl",
        "-lpthread",
        "-lrt",
      ],
      "ldflags": ["-Wl,--exclude-libs,ALL"],
    },
  ],
}
