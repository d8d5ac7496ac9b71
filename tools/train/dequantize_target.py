"""Write a bf16 copy of a moeflash MXFP4-expert checkpoint that HF transformers can load.

The shipped target keeps its experts in MXFP4 (fused `mlp.experts.gate_up_proj_blocks/_scales`,
gate rows first, then up). The drafter must learn to predict exactly that model, so it is trained
against this copy: every E2M1 value times its power-of-two scale is exact in bf16, so the copy
computes the same function as the MXFP4 model.

    python3 tools/train/dequantize_target.py MXFP4_DIR OUT_DIR
"""
import json
import os
import shutil
import sys

import numpy as np
import torch
from safetensors.torch import load_file, save_file

E2M1 = torch.tensor([0, 0.5, 1, 1.5, 2, 3, 4, 6, -0.0, -0.5, -1, -1.5, -2, -3, -4, -6], dtype=torch.float32)


def dequantize(blocks: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """blocks uint8 [..., n/32, 16] (element 2i in the low nibble), scales uint8 [..., n/32] -> float32 [..., n]."""
    lo = E2M1[(blocks & 0x0F).long()]
    hi = E2M1[(blocks >> 4).long()]
    vals = torch.stack([lo, hi], dim=-1).reshape(*blocks.shape[:-1], 32)
    scale = torch.pow(2.0, scales.to(torch.float32) - 127.0).unsqueeze(-1)
    return (vals * scale).reshape(*blocks.shape[:-2], blocks.shape[-2] * 32)


def main(src: str, out: str) -> None:
    cfg = json.load(open(os.path.join(src, 'config.json')))
    cfg.pop('quantization_config', None)
    inter = cfg['moe_intermediate_size']
    tensors = load_file(os.path.join(src, 'model.safetensors'))
    result = {}
    for name, t in tensors.items():
        if name.endswith('.experts.gate_up_proj_blocks'):
            p = name[: -len('.gate_up_proj_blocks')]
            w = dequantize(t, tensors[p + '.gate_up_proj_scales'])  # [E, 2I, H]
            for j in range(w.shape[0]):
                result[f'{p}.{j}.gate_proj.weight'] = w[j, :inter].to(torch.bfloat16).contiguous()
                result[f'{p}.{j}.up_proj.weight'] = w[j, inter:].to(torch.bfloat16).contiguous()
            assert torch.equal(w.to(torch.bfloat16).to(torch.float32), w), 'MXFP4 values must be exact in bf16'
        elif name.endswith('.experts.down_proj_blocks'):
            p = name[: -len('.down_proj_blocks')]
            w = dequantize(t, tensors[p + '.down_proj_scales'])  # [E, H, I]
            for j in range(w.shape[0]):
                result[f'{p}.{j}.down_proj.weight'] = w[j].to(torch.bfloat16).contiguous()
        elif name.endswith('_scales'):
            continue
        else:
            result[name] = t
    os.makedirs(out, exist_ok=True)
    save_file(result, os.path.join(out, 'model.safetensors'), metadata={'format': 'pt'})
    json.dump(cfg, open(os.path.join(out, 'config.json'), 'w'), indent=2)
    for f in ('tokenizer.json', 'tokenizer_config.json', 'generation_config.json'):
        if os.path.exists(os.path.join(src, f)):
            shutil.copy(os.path.join(src, f), out)
    print(f'wrote {out}: {len(result)} tensors, bf16 experts dequantized from MXFP4')


if __name__ == '__main__':
    main(sys.argv[1], sys.argv[2])
