# The CUDA addon: native/*.cc (node-addon-api) + kernels/*.cu (nvcc, sm_90a).
#
# Kernels are compiled by scripts/build-kernels.mjs, one nvcc per file in parallel, into a static
# archive; the addon links it with cudart_static so that only the NVIDIA driver (libcuda.so.1) is
# needed at run time. --exclude-libs keeps cudart's symbols private to this addon.
{
  "variables": {
    "cuda_home%": "<!(node scripts/build-kernels.mjs --cuda-home)",
    "kernels_out": "<(module_root_dir)/build/kernels",
    # Created at configure time (make needs the file to exist to plan its compile) and relative to
    # this file in both places that name it, so that make sees one file.
    "kernels_stamp": "<!(node scripts/build-kernels.mjs --stamp build/kernels/kernels_stamp.cc)",
  },
  "targets": [
    {
      "target_name": "moeflash_kernels",
      "type": "none",
      "actions": [
        {
          "action_name": "nvcc_kernels",
          "inputs": ["<!@(ls kernels/*.cu kernels/*.cuh kernels/*.h)", "scripts/build-kernels.mjs"],
          # always-check is never written, so make runs the script on every build; the script
          # recompiles only stale objects (headers included), which make's rule cannot see, and
          # rewrites kernels_stamp.cc when the archive changes: the addon compiles that file, so the
          # addon is linked again (make does not track the archive in "libraries"). make looks at
          # the stamp before this action runs, so a plain `node-gyp build` links one build late;
          # `pnpm run build:native` compiles the kernels first and links in the same run.
          "outputs": ["<(kernels_out)/libmoeflash_kernels.a", "<(kernels_stamp)",
                      "<(kernels_out)/always-check"],
          "action": ["node", "scripts/build-kernels.mjs", "<(kernels_out)", "<(kernels_stamp)"],
          "message": "nvcc kernels/*.cu",
        }
      ],
    },
    {
      "target_name": "moeflash_cuda",
      "dependencies": ["moeflash_kernels"],
      "sources": ["<!@(ls native/*.cc)", "<(kernels_stamp)"],
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
