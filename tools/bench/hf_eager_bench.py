"""HF transformers (PyTorch eager) decode speed on a moeflash synthetic checkpoint, for comparison
with `moeflash bench` on the same weights and shapes.

    python3 tools/bench/hf_eager_bench.py MODEL_DIR OUT.json [--batch 1,8] [--prompt 512] [--gen 64]

Decode time = time(generate prompt + gen tokens) - time(generate prompt + 1 token), per batch size.
MXFP4 experts are dequantized to bf16 by transformers (Mxfp4Config(dequantize=True)).
"""
import argparse
import json
import time

import torch
from transformers import AutoConfig, AutoModelForCausalLM

p = argparse.ArgumentParser()
p.add_argument('model')
p.add_argument('out')
p.add_argument('--batch', default='1,8')
p.add_argument('--prompt', type=int, default=512)
p.add_argument('--gen', type=int, default=64)
a = p.parse_args()

cfg = AutoConfig.from_pretrained(a.model)
kw = dict(dtype=torch.bfloat16, device_map='cuda', attn_implementation='eager')
if getattr(cfg, 'quantization_config', None):
    from transformers import Mxfp4Config
    kw['quantization_config'] = Mxfp4Config(dequantize=True)
t0 = time.time()
model = AutoModelForCausalLM.from_pretrained(a.model, **kw).eval()
load_s = time.time() - t0
print(f'loaded in {load_s:.1f} s; experts implementation {getattr(model.config, "_experts_implementation", "default")}', flush=True)


def gen(batch: int, new: int) -> float:
    ids = torch.randint(0, cfg.vocab_size - 1000, (batch, a.prompt), device='cuda', generator=torch.Generator('cuda').manual_seed(1))
    torch.cuda.synchronize()
    t = time.time()
    with torch.no_grad():
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new, min_new_tokens=new, do_sample=False, use_cache=True, pad_token_id=0)
    torch.cuda.synchronize()
    assert out.shape[1] == a.prompt + new, out.shape
    return time.time() - t


rows = []
for b in [int(x) for x in a.batch.split(',')]:
    gen(b, 2)  # warm-up
    t1 = gen(b, 1)
    tn = gen(b, a.gen + 1)
    step = (tn - t1) / a.gen
    rows.append({'batch': b, 'prefill_s': t1, 'decode_ms_per_step': step * 1000, 'decode_tokens_per_s': b / step})
    print(f'batch {b}: prefill+1 {t1:.2f} s, decode {step * 1000:.1f} ms/step, {b / step:.1f} tokens/s', flush=True)
res = {'framework': f'transformers {__import__("transformers").__version__} (PyTorch {torch.__version__}, eager, bf16, experts dequantized)',
       'device': torch.cuda.get_device_name(0), 'model': a.model, 'prompt': a.prompt, 'gen': a.gen, 'load_s': load_s, 'rows': rows}
json.dump(res, open(a.out, 'w'), indent=2)
print(json.dumps(res))
