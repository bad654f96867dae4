"""FLUX's adaLN modulations for every step at once, before the first.

Each block turns the step's conditioning vector `temb` (timestep, guidance, pooled text embedding) into its shifts,
scales and gates with a linear layer: `norm1.linear` and `norm1_context.linear` in the 19 double blocks, `norm.linear`
in the 38 single blocks, `norm_out.linear` at the end. That is 77 products of one row per image and step, each
reading its layer's weights for that one row (3.2 GB in FP8 at every step). `temb` depends on nothing the steps
compute: the scheduler's timesteps, the guidance and the pooled prompt are known before the loop. `use` computes all
steps' modulations at the first step, in one product of steps x images rows with the 77 layers' weights joined into
one matrix (read once per image; 77 products would each pay the host's launch and FP8-dispatch cost), and every step
the layers read their row from one buffer at a fixed address, so the blocks' CUDA graphs replay with it. The row is
the scheduler's step index: the transformer must be called from the pipeline's denoising loop (as every diffusers
FLUX pipeline does), with the pooled prompt and guidance tensors it passes at every step.
"""
import torch
from diffusers.hooks import HookRegistry, ModelHook
from diffusers.models.normalization import AdaLayerNormContinuous, AdaLayerNormZero, AdaLayerNormZeroSingle

from fluxlab.tensors import alive, mark, unchanged

HOOK = "fluxlab_modulation"
NORMS = (AdaLayerNormZero, AdaLayerNormZeroSingle, AdaLayerNormContinuous)
KEPT = 4  # tables kept: one per pooled prompt (two with true classifier-free guidance), a few images' worth


class Table:
    """Every step's modulations for the current images, and the buffer that holds the step's row."""

    def __init__(self, transformer, scheduler, norms: list[torch.nn.Module]):
        self.embed = transformer.time_text_embed
        self.joined = transformer.fluxlab_modulation  # every layer's linear, one after another (`join`)
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
                layer.row = self.rows[images][:, layer.start:layer.start + layer.features]
            self.images = images
        return self.rows[images]

    @staticmethod
    def _key(tensors) -> tuple:
        return tuple(None if t is None else mark(t) for t in tensors)

    @staticmethod
    def _same(key: tuple, tensors) -> bool:
        """The same tensors as when the key was made, alive and unchanged since."""
        return all(k is None and t is None or t is not None and unchanged(k, t) for k, t in zip(key, tensors))

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
        rows = self.joined(torch.nn.functional.silu(temb))  # every adaLN layer is linear(silu(temb))
        kept = [(key, rows) for key, rows in self.tables if all(k is None or alive(k) for k in key)]
        self.tables = kept[-(KEPT - 1):]
        self.tables.append((self._key(tensors), rows.view(steps, images, -1)))
        return self.tables[-1][1]


class Precomputed(torch.nn.Module):
    """Stands in for an adaLN layer's linear: this step's row of its output, `row`, a view of the table's buffer
    (a buffer of the module, so torch.compile takes it as an input: one compiled block serves every block). The
    layer's weights moved into the joined layer (`join`), from column `start` on, `features` of them."""

    def __init__(self, start: int, features: int):
        super().__init__()
        self.start, self.features = start, features
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


def join(norms: list[torch.nn.Module]) -> torch.nn.Linear:
    """One linear layer whose outputs are the adaLN layers' outputs, one after another: their weights and biases
    joined row-wise, each moved in as its layer is replaced (`Precomputed`), so the weights are never held twice.
    FP8 rowwise quantization then scales each output row as it scaled that row in its own layer."""
    first = norms[0].linear.weight
    features = sum(norm.linear.out_features for norm in norms)
    joined = torch.nn.Linear(first.shape[1], features, device="meta", dtype=first.dtype).to_empty(device=first.device)
    start = 0
    with torch.no_grad():
        for norm in norms:
            layer = norm.linear
            joined.weight[start:start + layer.out_features].copy_(layer.weight)
            joined.bias[start:start + layer.out_features].copy_(layer.bias)
            norm.linear = Precomputed(start, layer.out_features)
            start += layer.out_features
    return joined


def use(pipe) -> Table:
    """Give the pipeline's transformer modulations computed for all steps at the first (before FP8 quantization,
    which then quantizes the joined layer, CUDA graphs, First Block Cache and torch.compile of the blocks)."""
    transformer = pipe.transformer
    norms = [m for m in transformer.modules() if isinstance(m, NORMS)]
    for norm in norms:
        if not isinstance(norm.linear, torch.nn.Linear) or getattr(norm, "emb", None) is not None:
            raise ValueError(f"precompute_modulation expects FLUX's adaLN layers (linear(silu(temb))), not {norm}.")
        if type(norm.linear.weight) is not torch.nn.Parameter or norm.linear.bias is None:
            raise ValueError("precompute_modulation joins the adaLN layers' bf16 weights: apply it before FP8 "
                             "quantization.")
    transformer.fluxlab_modulation = join(norms)
    table = Table(transformer, pipe.scheduler, norms)
    HookRegistry.check_if_exists_or_initialize(transformer).register_hook(Step(table), HOOK)
    return table


def used(transformer) -> bool:
    """Whether `use` was applied."""
    return any(isinstance(m, Precomputed) for m in transformer.modules())
