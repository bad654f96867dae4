"""FLUX's adaLN modulations for every step at once, before the first.

Each block turns the step's conditioning vector `temb` (timestep, guidance, pooled text embedding) into its shifts,
scales and gates with a linear layer: `norm1.linear` and `norm1_context.linear` in the 19 double blocks, `norm.linear`
in the 38 single blocks, `norm_out.linear` at the end. That is 77 products of one row per image and step, each
reading its layer's weights for that one row (3.2 GB in FP8 at every step). `temb` depends on nothing the steps
compute: the scheduler's timesteps, the guidance and the pooled prompt are known before the loop. `use` computes all
steps' modulations at the first step, one product of steps x images rows per layer (its weights read once per
image), and every step the layers read their row from one buffer at a fixed address, so the blocks' CUDA graphs
replay with it. The row is the scheduler's step index: the transformer must be called from the pipeline's denoising
loop (as every diffusers FLUX pipeline does), with the pooled prompt and guidance tensors it passes at every step.
"""
import weakref

import torch
from diffusers.hooks import HookRegistry, ModelHook
from diffusers.models.normalization import AdaLayerNormContinuous, AdaLayerNormZero, AdaLayerNormZeroSingle

HOOK = "fluxlab_modulation"
NORMS = (AdaLayerNormZero, AdaLayerNormZeroSingle, AdaLayerNormContinuous)
KEPT = 4  # tables kept: one per pooled prompt (two with true classifier-free guidance), a few images' worth


class Table:
    """Every step's modulations for the current images, and the buffer that holds the step's row."""

    def __init__(self, transformer, scheduler, norms: list[torch.nn.Module]):
        self.embed = transformer.time_text_embed
        self.scheduler = scheduler
        self.norms = norms
        self.tables: list[tuple[tuple, torch.Tensor]] = []  # (key, steps x images x all layers' outputs)
        self.rows: dict[int, torch.Tensor] = {}  # images -> this step's row, at a fixed address
        self.images = None  # the batch the layers' views point into

    def row(self, images: int, like: torch.Tensor) -> torch.Tensor:
        """The buffer of this step's row for `images` images; the layers' views point into it."""
        if images not in self.rows:
            self.rows[images] = torch.empty_like(like)
        if self.images != images:
            for norm in self.norms:
                layer = norm.linear
                layer.row = self.rows[images][:, layer.start:layer.start + layer.linear.out_features]
            self.images = images
        return self.rows[images]

    def _key(self, *tensors) -> tuple:
        return tuple((weakref.ref(t), t._version) if t is not None else None for t in tensors)

    @staticmethod
    def _same(key: tuple, tensors) -> bool:
        """The same tensor objects as when the key was made (alive), unchanged since (`_version`)."""
        return all(k is None and t is None or k is not None and t is not None and k[0]() is t and k[1] == t._version
                   for k, t in zip(key, tensors))

    def table(self, pooled: torch.Tensor, guidance: torch.Tensor | None, timestep_dtype: torch.dtype,
              dtype: torch.dtype) -> torch.Tensor:
        """Every step's modulations for these images (computed at their first step, then kept)."""
        tensors = (self.scheduler.timesteps, pooled, guidance)
        for key, rows in self.tables:
            if self._same(key, tensors):
                return rows
        steps, images = len(self.scheduler.timesteps), pooled.shape[0]
        # As the pipeline and the transformer convert them, every step's timesteps, each repeated per image.
        timestep = (self.scheduler.timesteps.to(pooled.device, timestep_dtype).repeat_interleave(images) / 1000)
        timestep = timestep.to(dtype) * 1000
        pooled_all = pooled.repeat(steps, 1)
        if guidance is None:
            temb = self.embed(timestep, pooled_all)
        else:
            temb = self.embed(timestep, guidance.to(dtype).repeat(steps) * 1000, pooled_all)
        rows = torch.cat([norm.linear.linear(norm.silu(temb)) for norm in self.norms], dim=-1)
        alive = [(key, rows) for key, rows in self.tables if all(k is None or k[0]() is not None for k in key)]
        self.tables = alive[-(KEPT - 1):]
        self.tables.append((self._key(*tensors), rows.view(steps, images, -1)))
        return self.tables[-1][1]


class Precomputed(torch.nn.Module):
    """Stands in for an adaLN layer's linear: this step's row of its output, `row`, a view of the table's buffer
    (a buffer of the module, so torch.compile takes it as an input: one compiled block serves every block). The
    layer itself stays as `.linear` (quantized with the rest; the table computes with it)."""

    def __init__(self, linear: torch.nn.Linear, start: int):
        super().__init__()
        self.linear = linear
        self.start = start
        self.register_buffer("row", None, persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.row


class Step(ModelHook):
    """Before each transformer call: this step's row of the table into the buffer the layers read."""

    def __init__(self, table: Table):
        super().__init__()
        self.table = table

    def pre_forward(self, module, *args, **kwargs):
        if args or "pooled_projections" not in kwargs or "timestep" not in kwargs:
            raise ValueError("precompute_modulation reads the transformer's keyword arguments (hidden_states, "
                             "timestep, pooled_projections, guidance), as diffusers' FLUX pipelines pass them.")
        pooled, guidance, hidden = kwargs["pooled_projections"], kwargs.get("guidance"), kwargs["hidden_states"]
        rows = self.table.table(pooled, guidance, kwargs["timestep"].dtype, hidden.dtype)
        scheduler = self.table.scheduler
        step = scheduler.step_index if scheduler.step_index is not None else (scheduler.begin_index or 0)
        self.table.row(pooled.shape[0], rows[step]).copy_(rows[step])
        return args, kwargs


def use(pipe) -> Table:
    """Give the pipeline's transformer modulations computed for all steps at the first (before CUDA graphs,
    First Block Cache and torch.compile of the blocks; FP8 quantization may come before or after)."""
    transformer = pipe.transformer
    norms = [m for m in transformer.modules() if isinstance(m, NORMS)]
    for norm in norms:
        if not isinstance(norm.linear, torch.nn.Linear) or getattr(norm, "emb", None) is not None:
            raise ValueError(f"precompute_modulation expects FLUX's adaLN layers (linear(silu(temb))), not {norm}.")
    table = Table(transformer, pipe.scheduler, norms)
    start = 0
    for norm in norms:
        norm.linear = Precomputed(norm.linear, start)
        start += norm.linear.linear.out_features
    HookRegistry.check_if_exists_or_initialize(transformer).register_hook(Step(table), HOOK)
    return table


def used(transformer) -> bool:
    """Whether `use` was applied."""
    return any(isinstance(m, Precomputed) for m in transformer.modules())
