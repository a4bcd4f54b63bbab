"""The PyTorch side of experiments.benchmark: ResNet-18 train steps on command.

Run only by `experiments.benchmark`, as its own process (`python -m
experiments.benchmark_torch`): torch never shares a process with JAX or
TensorFlow here (torch next to TensorFlow in one process has crashed this
project), and the benchmark can alternate timed rounds between its JAX process
and this one, each idle while the other runs.

The protocol is one JSON object per line. The benchmark writes to stdin:
  {"op": "init", "threads": T, "batch_size": B, "image_size": S, "num_classes": C,
   "learning_rate": lr, "b1": b1, "b2": b2, "device": "cpu" or "cuda",
   "amp": false or true (autocast to bfloat16)}
  {"op": "init_convs", "threads": T, "batch_size": B, "specs": [...]}
                              instead of a model: ResNet-18's convolutions alone
  {"op": "steps", "n": N}     run N train steps (or rounds of the convolutions),
                              reply with their wall time
  {"op": "quit"}              (or end of input)
and reads one reply per request from stdout: {"ok": true, ...} or
{"ok": false, "error": "..."}. Nothing else is written to stdout: whatever a
library prints goes to stderr, so it cannot corrupt a reply.
"""

import json
import os
import sys
import time
import traceback
from typing import Callable


def _build(request: dict) -> tuple[dict, Callable[[], object]]:
  """The model, optimizer and fixed batch of `request`; returns (info, step)."""
  # Imported here, not at module level: only the worker process may hold torch.
  import torch  # pylint: disable=g-import-not-at-top
  import torchvision  # pylint: disable=g-import-not-at-top

  default_threads = torch.get_num_threads()
  torch.set_num_threads(int(request["threads"]))
  torch.manual_seed(0)
  model = torchvision.models.resnet18(weights=None, num_classes=int(request["num_classes"]))
  # Grayscale: the same 7x7 stride-2 stem as torchvision's, on one channel
  # (dicefer_jax.models.ResNet18Trunk has the same parameter count).
  model.conv1 = torch.nn.Conv2d(1, 64, kernel_size=7, stride=2, padding=3, bias=False)
  device = torch.device(request.get("device", "cpu"))
  model = model.to(device, memory_format=torch.channels_last).train()
  optimizer = torch.optim.Adam(model.parameters(), lr=float(request["learning_rate"]),
                               betas=(float(request["b1"]), float(request["b2"])))
  b, s = int(request["batch_size"]), int(request["image_size"])
  generator = torch.Generator().manual_seed(0)
  images = torch.randn(b, 1, s, s, generator=generator).to(
      device, memory_format=torch.channels_last)
  labels = torch.randint(0, int(request["num_classes"]), (b,), generator=generator).to(device)

  amp = bool(request.get("amp", False))

  def step():
    optimizer.zero_grad(set_to_none=True)
    # AMP as PyTorch users write it: autocast around the forward pass and the
    # loss; bfloat16 (what JAX's half_precision uses) needs no GradScaler.
    with torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=amp):
      loss = torch.nn.functional.cross_entropy(model(images), labels)
    loss.backward()
    optimizer.step()
    return loss

  info = dict(torch=torch.__version__, torchvision=torchvision.__version__, device=str(device),
              default_threads=default_threads, threads=torch.get_num_threads(),
              interop_threads=torch.get_num_interop_threads(),
              params=sum(p.numel() for p in model.parameters()), amp=amp)
  return info, step


def _build_convs(request: dict) -> tuple[dict, Callable[[], object]]:
  """Every convolution of `request["specs"]` (experiments.benchmark's
  resnet18_conv_specs): forward, then the gradients autograd would take in a
  train step (input and weight; the weight only for the stem), channels_last."""
  import torch  # pylint: disable=g-import-not-at-top
  import torch.nn.functional as F  # pylint: disable=g-import-not-at-top

  torch.set_num_threads(int(request["threads"]))
  generator = torch.Generator().manual_seed(0)
  b = int(request["batch_size"])
  convs = []
  for spec in request["specs"]:
    k, stride, n = int(spec["k"]), int(spec["stride"]), int(spec["size"])
    out = (n + 2 * (k // 2) - k) // stride + 1
    x = torch.randn(b, spec["cin"], n, n, generator=generator).to(
        memory_format=torch.channels_last).requires_grad_(bool(spec["input_grad"]))
    w = (torch.randn(spec["cout"], spec["cin"], k, k, generator=generator) * 0.05).to(
        memory_format=torch.channels_last).requires_grad_(True)
    g = torch.randn(b, spec["cout"], out, out, generator=generator).to(
        memory_format=torch.channels_last)
    convs.append((x, w, g, stride, k // 2, bool(spec["input_grad"])))

  def step():
    for x, w, g, stride, pad, input_grad in convs:
      y = F.conv2d(x, w, stride=stride, padding=pad)
      torch.autograd.grad(y, (x, w) if input_grad else (w,), g)
    return y

  return dict(threads=torch.get_num_threads(), convs=len(convs)), step


def serve(requests, reply) -> None:
  """Answers `requests` (an iterable of JSON lines) through `reply(dict)`."""
  step = None
  for line in requests:
    if not line.strip():
      continue
    try:
      request = json.loads(line)
      op = request.get("op")
      if op == "quit":
        return
      if op == "init":
        info, step = _build(request)
        reply(dict(ok=True, **info))
      elif op == "init_convs":
        info, step = _build_convs(request)
        reply(dict(ok=True, **info))
      elif op == "steps":
        if step is None:
          raise RuntimeError("'steps' before 'init'")
        start = time.perf_counter()
        for _ in range(int(request["n"])):
          loss = step()
        # Eager CPU kernels have finished when they return; reading a value
        # waits for an accelerator's queue too.
        loss.flatten()[0].item()
        reply(dict(ok=True, seconds=time.perf_counter() - start))
      else:
        raise ValueError(f"unknown op {op!r}")
    except Exception as e:  # pylint: disable=broad-except
      traceback.print_exc(file=sys.stderr)
      reply(dict(ok=False, error=f"{type(e).__name__}: {e}"))


def main() -> None:
  # Replies go to a private copy of stdout; fd 1 itself now points at stderr,
  # so a library's print (or a C library's write to fd 1) cannot break a reply.
  replies = os.fdopen(os.dup(sys.stdout.fileno()), "w", buffering=1)
  os.dup2(sys.stderr.fileno(), sys.stdout.fileno())

  def reply(message: dict) -> None:
    replies.write(json.dumps(message) + "\n")
    replies.flush()

  serve(sys.stdin, reply)


if __name__ == "__main__":
  main()
