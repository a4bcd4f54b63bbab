"""Process settings that must be in place before JAX or TensorFlow is imported.

Entry points import this module first. Settings are defaults: anything the user
exported already wins.
"""

import os

# XLA:CPU (jaxlib 0.10) routes convolutions through YNNPACK fusions by default; on
# the ResNet-18 step they are ~1.4x slower than the Eigen path (measured on a
# 2-core x86 CPU). The flag is ignored by GPU/TPU compilation.
_CPU_FLAG = "--xla_cpu_experimental_ynn_fusion_type="
if "xla_cpu_experimental_ynn_fusion_type" not in os.environ.get("XLA_FLAGS", ""):
  os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " " + _CPU_FLAG).strip()
# TensorFlow only feeds data here: keep its oneDNN banner and info logs quiet.
os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "0")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
