"""vae.py: 3D causal VAE — SKELETON, being written (see the issue). The helper replaces this docstring."""
import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

