"""What a user might build instead of kiln serve: one FastAPI app under uvicorn (one process), the
same models loaded through the same Kiln runtime, the same JSON request and response as Kiln's
infer.

Run by bench/serve_latency.py: ``python -m uvicorn fastapi_baseline:app`` with KILN_BENCH_MODELS set
to ``name=artifact_dir,...`` and KILN_BENCH_THREADS to ``name=threads,...``.
"""

from __future__ import annotations

import json
import os

import numpy as np
import torch
from fastapi import FastAPI, Request, Response

from kiln.models.predictor import load_predictor

app = FastAPI()
MODELS = {
    name: load_predictor(path)
    for name, path in (
        item.split("=", 1) for item in os.environ.get("KILN_BENCH_MODELS", "").split(",") if item
    )
}
THREADS = {
    name: int(n)
    for name, n in (
        item.split("=", 1) for item in os.environ.get("KILN_BENCH_THREADS", "").split(",") if item
    )
}


@app.post("/{name}/infer")
async def infer(name: str, request: Request) -> Response:
    predictor = MODELS[name]
    torch.set_num_threads(THREADS.get(name, 1))
    tensor = (await request.json())["inputs"][0]
    x = np.asarray(tensor["data"], dtype=np.uint8).reshape(tensor["shape"])
    probs = predictor.predict_proba(x)  # inline: the usual way, one request at a time
    labels = [str(predictor.spec.labels[i]) for i in probs.argmax(axis=1)]
    out = {
        "model_name": name,
        "outputs": [
            {
                "name": "probabilities",
                "datatype": "FP32",
                "shape": list(probs.shape),
                "data": probs.ravel().tolist(),
            },
            {"name": "label", "datatype": "BYTES", "shape": [len(labels)], "data": labels},
        ],
    }
    return Response(json.dumps(out, separators=(",", ":")), media_type="application/json")
