"""GPT-2's weights on disk: the safetensors format, read and written without pickle, and the download of
the Hugging Face hub's files (model.GPT.from_pretrained maps the names; tools/export.py writes them back).
"""
import json
import struct
from pathlib import Path

import torch

from data.formats import download
from data.tokenizer import cache_dir

GPT2_NAMES = ("gpt2", "gpt2-medium", "gpt2-large", "gpt2-xl")
SAFETENSORS_DTYPES = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16, "F64": torch.float64,
                      "I64": torch.int64, "I32": torch.int32, "U8": torch.uint8, "BOOL": torch.bool}


def read_safetensors(path):
    """The safetensors format: an 8-byte little-endian header length N, N bytes of JSON
    {name: {dtype, shape, data_offsets: [begin, end]}}, then the raw little-endian tensor bytes."""
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(n))
        buf = bytearray(Path(path).stat().st_size - 8 - n)  # writable, so torch.frombuffer can view it
        f.readinto(buf)
    tensors = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        begin, end = info["data_offsets"]
        dtype = SAFETENSORS_DTYPES[info["dtype"]]
        t = torch.frombuffer(buf[begin:end], dtype=dtype) if end > begin else torch.empty(0, dtype=dtype)
        tensors[name] = t.reshape(info["shape"]).clone().float() if dtype.is_floating_point else t.clone()
    return tensors


def write_safetensors(path, tensors):
    """Write {name: tensor} in the safetensors format (used by tests and for exporting)."""
    names = {v: k for k, v in SAFETENSORS_DTYPES.items()}
    header, blobs, offset = {}, [], 0
    for name, t in tensors.items():
        raw = t.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes()
        header[name] = {"dtype": names[t.dtype], "shape": list(t.shape), "data_offsets": [offset, offset + len(raw)]}
        blobs.append(raw)
        offset += len(raw)
    head = json.dumps(header).encode()
    head += b" " * (-len(head) % 8)  # the format aligns the data to 8 bytes
    Path(path).write_bytes(struct.pack("<Q", len(head)) + head + b"".join(blobs))


def download_gpt2(name):
    """config.json and model.safetensors of a GPT-2 size, fetched from the Hugging Face hub into the cache
    once; returns their directory."""
    target = cache_dir() / "models" / name
    for fname in ("config.json", "model.safetensors"):
        download(f"https://huggingface.co/{name}/resolve/main/{fname}", target / fname,
                 hint="or give a local Hugging Face directory instead of the name")
    return target
