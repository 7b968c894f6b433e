"""Every CUDA-only adaptation megatron-core 0.16.1 needs to run on CPU with gloo, in one place.

``apply_cpu_shims()`` is a no-op when ``torch.cuda.is_available()``; without CUDA it patches, once
(it is idempotent), exactly the places listed below. Each patch replaces a *module attribute*
inside one megatron-core module, so only that module's code sees it; the global ``torch``,
``torch.cuda`` and ``torch.Tensor`` are left alone, with one exception scoped to the duration of a
single method call (2c below).

Patch kinds
-----------
1. ``_CpuTorchView`` (module-scoped ``torch``): megatron-core modules use ``torch.cuda.current_device()``
   and ``device="cuda"`` literally as the device of tensors they allocate. For the modules listed in
   ``TORCH_VIEW_MODULES`` the module-global name ``torch`` is rebound to a view that forwards every
   attribute to the real ``torch`` except:
   - tensor factories (``zeros``, ``empty``, ``tensor``, ...) map a CUDA ``device`` to CPU and drop
     ``pin_memory`` (pinning needs an accelerator);
   - ``torch.cuda`` is a view whose ``current_device()`` returns ``torch.device("cpu")``,
     ``synchronize``/``empty_cache`` are no-ops, and ``get_rng_state``/``set_rng_state``/
     ``manual_seed`` act on the CPU generator (the "device" generator is the CPU one here);
     everything else (``is_available``, ``FloatTensor``, ...) is forwarded unchanged.
   Functions already defined in those modules read the global ``torch`` at call time, so they
   see the view; ``isinstance(x, torch.Tensor)`` etc. still get the real classes.

2. Function replacements where a literal cannot be redirected by a device mapping:
   a ``tensor_parallel/random.py::_get_cuda_rng_state`` / ``_set_cuda_rng_state``: they call
     ``torch.cuda.random.get_rng_state`` and index ``torch.cuda.default_generators``; replaced by
     CPU-generator versions. This makes ``CudaRNGStatesTracker.add/fork``,
     ``model_parallel_cuda_manual_seed``, ``get_cuda_rng_tracker().fork()`` (used by attention
     dropout and by ``tensor_parallel.checkpoint``) work; forked states are CPU generator states.
     The tracker's fork logs "CPU RNG state changed within GPU RNG context" whenever something
     random runs inside the fork, which is always the case once the tracked generator *is* the CPU
     one; a logging filter on that one logger drops exactly that message.
   b ``optimizer/clip_grads.py::clip_grad_by_total_norm_fp32`` asserts
     ``param.grad.type() == 'torch.cuda.FloatTensor'``; replaced by a version that checks for an
     fp32 grad on any device and scales in place (same math). ``optimizer/optimizer.py`` imported
     the name directly, so its module attribute is rebound too.
   c ``models/common/language_module/language_module.py::LanguageModule.
     setup_embeddings_and_output_layer`` calls ``weight.data.cuda()`` (a Tensor method) before the
     all-reduce that syncs tied embedding/output weights between the first and last pipeline
     stage (PP > 1 with ``share_embeddings_and_output_weights=True``). The method is wrapped so
     that, only while it runs, ``torch.Tensor.cuda`` returns the tensor itself; likewise
     ``optimizer/grad_scaler.py::DynamicGradScaler.load_state_dict`` (``scale.cuda()`` when an
     ``--fp16`` run resumes).
   d ``DistributedOptimizer.__init__`` and ``Float16OptimizerWithFloat16Params.__init__``
     (``--bf16`` / ``--fp16``) sort parameters by ``param.type()`` strings
     (``'torch.cuda.BFloat16Tensor'``...) and reject anything else; while they run, CPU tensors
     report the CUDA name of their dtype.
   e ``transformer/moe/token_dispatcher.py`` (``MoEAlltoAllTokenDispatcher.
     _maybe_dtoh_and_synchronize``, line ~879) asks ``moe_utils.maybe_move_tensor_to_cpu(...,
     as_numpy=True)`` for the all-to-all split sizes, which converts only CUDA tensors
     (``moe_utils.py`` ~1093); a CPU tensor stays a tensor and ``all_to_all_single`` refuses it
     as split sizes (expert parallelism with ``--moe-token-dispatcher-type alltoall``). The
     dispatcher module's name is rebound to a version that also turns a CPU tensor into NumPy
     when asked to.
   f ``models/common/embeddings/rope_utils.py::get_pos_emb_on_this_cp_rank`` (context
     parallelism, ``--context-parallel-size`` > 1) builds its two chunk indices with
     ``torch.tensor(..., pin_memory=True).cuda()``; ``YarnRotaryEmbedding.__init__`` (MLA with
     YaRN) calls it through ``yarn_rotary_pos_embedding``'s imported name when it fills its
     cache. Both names are rebound to a version that selects the same chunks (``cp_rank`` and
     ``2 x cp_size - 1 - cp_rank`` of ``2 x cp_size``) on the tensor's own device.
   These scoped ``torch.Tensor`` overrides (c, d) are the only places where a ``torch``
   attribute is touched, each restored in ``finally``.

Modules that get the ``torch`` view (``TORCH_VIEW_MODULES``), each seen failing on CPU and then
used (``MT_DIALOG_CPU_SHIM_TRACE=1`` records the redirected calls) in the verified paths:
single process, TP=2, PP=2 (untied and tied embeddings), DP=2, TP=2 x DP=2, DP=2 with the
distributed optimizer; DDP + finalize_model_grads + get_megatron_optimizer (Adam, clip_grad):
   - pipeline_parallel/schedules.py: ``total_num_tokens = torch.zeros([], ..., device="cuda")`` in
     every forward_backward_* schedule.
   - pipeline_parallel/p2p_communication.py: receive buffers allocated on
     ``torch.cuda.current_device()``; ``torch.cuda.synchronize()`` after batched isend/irecv.
   - tensor_parallel/random.py: ``torch.cuda.get_rng_state/manual_seed`` in
     ``CudaRNGStatesTracker.add`` and ``model_parallel_cuda_manual_seed``.
   - optimizer/clip_grads.py: ``device='cuda'`` tensors in ``get_grad_norm_fp32``
     (and ``count_zeros_fp32``).
   - optimizer/optimizer.py: ``_dummy_overflow_buf``/``_scale_one``/``found_inf``
     (``device='cuda'``) in ``MixedPrecisionOptimizer``/``FP32Optimizer.__init__``.
   - optimizer/grad_scaler.py: the loss scale tensors (``device='cuda'``; ``--fp16``).
   - utils.py: ``local_multi_tensor_l2_norm`` (``device="cuda"``; the no-apex/no-TE fallback used
     for the grad norm) and ``GlobalMemoryBuffer.get_tensor``.
   - distributed/param_and_grad_buffer.py: DDP grad (and param) buffers on
     ``torch.cuda.current_device()``.
   - models/common/embeddings/rotary_pos_embedding.py: ``RotaryEmbedding.get_emb`` moves
     ``inv_freq`` to ``torch.cuda.current_device()`` on first use.
   - models/common/embeddings/yarn_rotary_pos_embedding.py: ``YarnRotaryEmbedding.get_emb``
     moves ``inv_freq_extra`` / ``inv_freq_inter`` the same way (already in ``__init__``).
   - tensor_parallel/mappings.py: ``_gather_along_last_dim`` output buffers on
     ``torch.cuda.current_device()``; attention gathers the key/value heads with it when the
     tensor-parallel size exceeds the query groups (one KV head at TP=2, as in small Qwen2s).
   - transformer/moe/router.py: ``Router.gating`` moves a CPU router weight "to GPU" with
     ``self.weight.data.to(device=torch.cuda.current_device())`` on every call (line ~90).
   - transformer/moe/token_dispatcher.py: ``MoEAlltoAllTokenDispatcher.__init__`` creates
     ``torch.cuda.Stream()`` for its device-to-host copies (line ~445) and
     ``_maybe_dtoh_and_synchronize`` uses ``torch.cuda.current_stream()`` /
     ``torch.cuda.stream(...)`` / ``record_event`` (lines ~871-895); the view's ``Stream``,
     ``current_stream`` and ``stream`` give one stream object whose waits are no-ops (CPU work is
     done when queued).
Other megatron-core modules have the same kind of call sites on paths not used here, e.g.
tensor_parallel/layers.py and tensor_parallel/utils.py (sequence
parallel, which the local spec's torch norms refuse anyway), optimizer/distrib_optimizer.py,
rerun_state_machine.py. Pass them as ``apply_cpu_shims(extra_modules=(...))`` when a new path needs
them, and add them to the list once verified.

With CUDA present, ``apply_cpu_shims()`` returns without touching anything.
"""

from __future__ import annotations

import contextlib
import functools
import importlib
import logging
import os
import threading
from typing import Any, Dict, Iterable, List

import torch

__all__ = ["apply_cpu_shims", "cpu_shims_applied", "define_missing_te_names", "shim_report",
           "TORCH_VIEW_MODULES"]

_LOCK = threading.Lock()
_APPLIED = False
_PATCHED: List[str] = []
# When MT_DIALOG_CPU_SHIM_TRACE=1, record which redirected call sites actually ran.
_TRACE = os.environ.get("MT_DIALOG_CPU_SHIM_TRACE", "0") == "1"
_TRACE_HITS: Dict[str, int] = {}

_CPU = torch.device("cpu")

# Modules whose global ``torch`` is rebound to a ``_CpuTorchView`` (see module docstring).
TORCH_VIEW_MODULES = (
    "megatron.core.pipeline_parallel.schedules",
    "megatron.core.pipeline_parallel.p2p_communication",
    "megatron.core.tensor_parallel.random",
    "megatron.core.optimizer.clip_grads",
    "megatron.core.optimizer.optimizer",
    "megatron.core.utils",
    "megatron.core.distributed.param_and_grad_buffer",
    "megatron.core.models.common.embeddings.rotary_pos_embedding",
    # --position-embedding-type yarn: YarnRotaryEmbedding.get_emb moves its two inverse-frequency
    # tables to torch.cuda.current_device() (at construction too: it fills a cos/sin cache)
    "megatron.core.models.common.embeddings.yarn_rotary_pos_embedding",
    # attention with tensor-parallel size > query groups gathers the replicated KV heads
    "megatron.core.tensor_parallel.mappings",
    # dist_checkpointing save: torch.cuda.synchronize() before writing, and the failure flag
    # tensors on torch.cuda.current_device()
    "megatron.core.dist_checkpointing.strategies.filesystem_async",
    "megatron.core.dist_checkpointing.strategies.async_utils",
    "megatron.core.dist_checkpointing.strategies.state_dict_saver",
    # the distributed optimizer: state buffers and checkpoint shards on torch.cuda.current_device()
    "megatron.core.optimizer.distrib_optimizer",
    # --fp16: the loss scale tensors
    "megatron.core.optimizer.grad_scaler",
    # Mixture of Experts (--num-experts): the router's weight "moved to GPU", the alltoall
    # dispatcher's CUDA stream
    "megatron.core.transformer.moe.router",
    "megatron.core.transformer.moe.token_dispatcher",
    # MLA with --rope-type yarn: YarnRotaryEmbedding's inverse frequencies on current_device()
    "megatron.core.models.common.embeddings.yarn_rotary_pos_embedding",
)

# Tensor factories whose ``device=`` / ``pin_memory=`` keywords get mapped.
_FACTORIES = frozenset(
    {
        "zeros", "ones", "empty", "full", "tensor", "as_tensor", "arange", "empty_strided",
        "zeros_like", "ones_like", "empty_like", "full_like", "rand", "randn", "randint",
    }
)


def _is_cuda_device(device: Any) -> bool:
    if isinstance(device, torch.device):
        return device.type == "cuda"
    if isinstance(device, str):
        return device == "cuda" or device.startswith("cuda:")
    # An int device in megatron-core code is a CUDA ordinal (torch.cuda.current_device()).
    return isinstance(device, int) and not isinstance(device, bool)


def _note(site: str) -> None:
    if _TRACE:
        _TRACE_HITS[site] = _TRACE_HITS.get(site, 0) + 1


def _wrap_factory(module_name: str, name: str, fn):
    @functools.wraps(fn)
    def factory(*args, **kwargs):
        if _is_cuda_device(kwargs.get("device")):
            kwargs["device"] = _CPU
            _note(f"{module_name}: torch.{name}(device=cuda)")
        if kwargs.get("pin_memory"):
            kwargs["pin_memory"] = False
        return fn(*args, **kwargs)

    return factory


class _CpuStream:
    """The one "stream" of a CPU process: work is already done when it is queued, so waiting,
    recording and synchronizing have nothing to do."""

    def wait_stream(self, other) -> None:
        pass

    def record_event(self, event=None) -> "_CpuStream":
        return self

    def synchronize(self) -> None:
        pass


_CPU_STREAM = _CpuStream()


class _CpuCudaView:
    """What ``torch.cuda`` looks like to a shimmed module on a CUDA-less machine."""

    def __init__(self, module_name: str):
        self._module_name = module_name

    def current_device(self):
        _note(f"{self._module_name}: torch.cuda.current_device()")
        return _CPU

    def synchronize(self, device=None):
        _note(f"{self._module_name}: torch.cuda.synchronize()")

    def empty_cache(self):
        _note(f"{self._module_name}: torch.cuda.empty_cache()")

    def get_rng_state(self, device="cuda"):
        _note(f"{self._module_name}: torch.cuda.get_rng_state()")
        return torch.get_rng_state()

    def set_rng_state(self, new_state, device="cuda"):
        _note(f"{self._module_name}: torch.cuda.set_rng_state()")
        torch.set_rng_state(new_state)

    def manual_seed(self, seed):
        _note(f"{self._module_name}: torch.cuda.manual_seed()")
        torch.manual_seed(seed)

    def Stream(self, *args, **kwargs):  # noqa: N802 - torch.cuda's name
        _note(f"{self._module_name}: torch.cuda.Stream()")
        return _CPU_STREAM

    def current_stream(self, device=None):
        _note(f"{self._module_name}: torch.cuda.current_stream()")
        return _CPU_STREAM

    def stream(self, stream):
        _note(f"{self._module_name}: torch.cuda.stream()")
        return contextlib.nullcontext()

    def __getattr__(self, name):
        return getattr(torch.cuda, name)


class _CpuTorchView:
    """Stands in for the ``torch`` module inside one megatron-core module (see docstring)."""

    def __init__(self, module_name: str):
        self._module_name = module_name
        self.cuda = _CpuCudaView(module_name)
        self._factories: Dict[str, Any] = {}

    def __getattr__(self, name):
        attr = getattr(torch, name)
        if name in _FACTORIES:
            wrapped = self._factories.get(name)
            if wrapped is None:
                wrapped = self._factories[name] = _wrap_factory(self._module_name, name, attr)
            return wrapped
        return attr

    def __repr__(self):
        return f"<mt_dialog CPU view of torch for {self._module_name}>"


# --------------------------------------------------------------------------------------------
# Function replacements
# --------------------------------------------------------------------------------------------


def _cpu_get_rng_state(device="cuda", clone: bool = False, graph_safe: bool = False):
    """CPU stand-in for tensor_parallel.random._get_cuda_rng_state (returns a copy already)."""
    _note("tensor_parallel.random: _get_cuda_rng_state")
    return torch.get_rng_state()


def _cpu_set_rng_state(new_state, device=-1, graph_safe: bool = False):
    """CPU stand-in for tensor_parallel.random._set_cuda_rng_state."""
    _note("tensor_parallel.random: _set_cuda_rng_state")
    torch.set_rng_state(new_state)


class _DropForkedCpuRngWarning(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return "CPU RNG state changed within GPU RNG context" not in record.getMessage()


def _make_clip_grad_by_total_norm_fp32(clip_grads_module):
    to_local_if_dtensor = clip_grads_module.to_local_if_dtensor

    def clip_grad_by_total_norm_fp32(parameters, max_norm, total_norm, use_decoupled_grad=False):
        """CPU version of clip_grads.clip_grad_by_total_norm_fp32: same math, but the fp32 check
        does not require a CUDA tensor type."""
        _note("optimizer.clip_grads: clip_grad_by_total_norm_fp32")
        if isinstance(parameters, torch.Tensor):
            parameters = [parameters]
        grads = []
        for param in parameters:
            grad = getattr(param, "decoupled_grad", None) if use_decoupled_grad else param.grad
            if grad is None:
                continue
            if use_decoupled_grad:
                assert grad.dtype in (torch.float32, torch.bfloat16)
            else:
                assert grad.dtype == torch.float32, f"expected an fp32 grad, got {grad.dtype}"
            grads.append(to_local_if_dtensor(grad).detach())
        clip_coeff = max_norm / (total_norm + 1.0e-6)
        if clip_coeff < 1.0:
            for g in grads:
                g.mul_(clip_coeff)

    return clip_grad_by_total_norm_fp32


def _cpu_pos_emb_on_this_cp_rank(pos_emb, seq_dim: int, cp_group):
    """Shim f: the rows of ``pos_emb`` along ``seq_dim`` that context-parallel rank r holds:
    chunks r and 2N - 1 - r of 2N (the causal load-balanced split), on ``pos_emb``'s device."""
    if cp_group is None:
        raise ValueError("cp_group must be provided to get positional embedding per CP rank")
    size, rank = cp_group.size(), cp_group.rank()
    shape = pos_emb.shape
    chunks = pos_emb.view(*shape[:seq_dim], 2 * size, -1, *shape[seq_dim + 1:])
    index = torch.tensor([rank, 2 * size - rank - 1], device=pos_emb.device)
    kept = chunks.index_select(seq_dim, index)
    return kept.view(*shape[:seq_dim], -1, *shape[seq_dim + 1:])


def _make_move_to_cpu(original):
    """``moe_utils.maybe_move_tensor_to_cpu`` that gives NumPy for a CPU tensor too when
    ``as_numpy`` (2e)."""

    @functools.wraps(original)
    def maybe_move_tensor_to_cpu(tensor, as_numpy: bool = False, record_stream: bool = False):
        if as_numpy and torch.is_tensor(tensor) and tensor.device.type == "cpu":
            _note("transformer.moe.token_dispatcher: CPU split sizes as NumPy")
            return tensor.numpy()
        return original(tensor, as_numpy=as_numpy, record_stream=record_stream)

    maybe_move_tensor_to_cpu._mt_dialog_cpu_shim = True
    return maybe_move_tensor_to_cpu


@contextlib.contextmanager
def _tensor_method(name: str, make_replacement):
    """Within the block only, ``torch.Tensor.<name>`` is ``make_replacement(original)``."""
    original = getattr(torch.Tensor, name)
    setattr(torch.Tensor, name, make_replacement(original))
    try:
        yield
    finally:
        setattr(torch.Tensor, name, original)


def _tensor_cuda_stays_on_cpu(original, site: str):
    """``original`` with ``Tensor.cuda()`` returning the tensor itself while it runs (2c)."""

    @functools.wraps(original)
    def wrapped(*args, **kwargs):
        def _stay_on_cpu(cuda):
            def stay(t, *a, **k):
                _note(f"{site}: Tensor.cuda()")
                return t
            return stay

        with _tensor_method("cuda", _stay_on_cpu):
            return original(*args, **kwargs)

    wrapped._mt_dialog_cpu_shim = True
    return wrapped


def _cpu_tensors_report_cuda_types(original, site: str):
    """``original`` with ``Tensor.type()`` of CPU tensors giving the CUDA type name of their
    dtype ('torch.cuda.BFloat16Tensor'...) while it runs (2d)."""

    @functools.wraps(original)
    def wrapped(*args, **kwargs):
        def _cuda_type_name(tensor_type):
            def type_name(t, *a, **k):
                if not a and not k and t.device.type == "cpu":
                    _note(f"{site}: param.type() as torch.cuda.*")
                    return tensor_type(t).replace("torch.", "torch.cuda.", 1)
                return tensor_type(t, *a, **k)
            return type_name

        with _tensor_method("type", _cuda_type_name):
            return original(*args, **kwargs)

    wrapped._mt_dialog_cpu_shim = True
    return wrapped


def _wrap_method(cls, name: str, make, site: str) -> None:
    """Replace ``cls.name`` by ``make(original, site)`` once."""
    original = getattr(cls, name)
    if not getattr(original, "_mt_dialog_cpu_shim", False):
        setattr(cls, name, make(original, site))
        _PATCHED.append(f"{site} ({make.__name__})")


# --------------------------------------------------------------------------------------------


def _install_torch_view(name: str) -> None:
    mod = importlib.import_module(name)
    if not isinstance(getattr(mod, "torch", None), _CpuTorchView):
        mod.torch = _CpuTorchView(name)
        _PATCHED.append(f"{name}.torch -> CPU view")


def apply_cpu_shims(extra_modules: Iterable[str] = ()) -> bool:
    """Adapt megatron-core 0.16.1 to a CUDA-less machine. No-op (returns False) with CUDA.

    ``extra_modules``: further megatron-core module names whose ``torch`` gets the CPU view (see
    the module docstring). Idempotent (extra modules may be added by a later call); returns True
    when the shims are (now or already) in place.
    """
    global _APPLIED
    if torch.cuda.is_available():
        return False
    with _LOCK:
        for name in extra_modules:
            _install_torch_view(name)
        if _APPLIED:
            return True

        for name in TORCH_VIEW_MODULES:
            _install_torch_view(name)

        random_mod = importlib.import_module("megatron.core.tensor_parallel.random")
        if random_mod._get_cuda_rng_state is not _cpu_get_rng_state:
            random_mod._get_cuda_rng_state = _cpu_get_rng_state
            random_mod._set_cuda_rng_state = _cpu_set_rng_state
            _PATCHED.append("tensor_parallel.random._get/_set_cuda_rng_state -> CPU generator")
        rng_logger = logging.getLogger(random_mod.__name__)
        if not any(isinstance(f, _DropForkedCpuRngWarning) for f in rng_logger.filters):
            rng_logger.addFilter(_DropForkedCpuRngWarning())

        clip_mod = importlib.import_module("megatron.core.optimizer.clip_grads")
        opt_mod = importlib.import_module("megatron.core.optimizer.optimizer")
        if not getattr(clip_mod.clip_grad_by_total_norm_fp32, "_mt_dialog_cpu_shim", False):
            fn = _make_clip_grad_by_total_norm_fp32(clip_mod)
            fn._mt_dialog_cpu_shim = True
            clip_mod.clip_grad_by_total_norm_fp32 = fn
            opt_mod.clip_grad_by_total_norm_fp32 = fn
            _PATCHED.append("optimizer.clip_grads.clip_grad_by_total_norm_fp32 (+ optimizer.py)")

        lm_mod = importlib.import_module("megatron.core.models.common.language_module.language_module")
        _wrap_method(lm_mod.LanguageModule, "setup_embeddings_and_output_layer",
                     _tensor_cuda_stays_on_cpu, "LanguageModule.setup_embeddings_and_output_layer")
        scaler_mod = importlib.import_module("megatron.core.optimizer.grad_scaler")
        _wrap_method(scaler_mod.DynamicGradScaler, "load_state_dict", _tensor_cuda_stays_on_cpu,
                     "DynamicGradScaler.load_state_dict")
        dist_opt = importlib.import_module("megatron.core.optimizer.distrib_optimizer")
        _wrap_method(dist_opt.DistributedOptimizer, "__init__", _cpu_tensors_report_cuda_types,
                     "DistributedOptimizer.__init__")
        _wrap_method(opt_mod.Float16OptimizerWithFloat16Params, "__init__",
                     _cpu_tensors_report_cuda_types, "Float16OptimizerWithFloat16Params.__init__")

        dispatcher = importlib.import_module("megatron.core.transformer.moe.token_dispatcher")
        if not getattr(dispatcher.maybe_move_tensor_to_cpu, "_mt_dialog_cpu_shim", False):
            dispatcher.maybe_move_tensor_to_cpu = _make_move_to_cpu(
                dispatcher.maybe_move_tensor_to_cpu)
            _PATCHED.append("transformer.moe.token_dispatcher.maybe_move_tensor_to_cpu: NumPy "
                            "split sizes from CPU tensors")

        for name in ("megatron.core.models.common.embeddings.rope_utils",
                     "megatron.core.models.common.embeddings.yarn_rotary_pos_embedding"):
            module = importlib.import_module(name)
            if module.get_pos_emb_on_this_cp_rank is not _cpu_pos_emb_on_this_cp_rank:
                module.get_pos_emb_on_this_cp_rank = _cpu_pos_emb_on_this_cp_rank
                _PATCHED.append(f"{name}.get_pos_emb_on_this_cp_rank: CPU chunk indices")

        # megatron-core's tensor-parallel linears advise CUDA_DEVICE_MAX_CONNECTIONS=1 (CUDA
        # stream scheduling) once per process when TP > 1; CPU runs have no CUDA streams, so
        # that one-time advice is marked as given (tensor_parallel/layers.py, ``.warned``).
        layers_mod = importlib.import_module("megatron.core.tensor_parallel.layers")
        layers_mod.linear_with_grad_accumulation_and_async_allreduce.warned = True
        _PATCHED.append("tensor_parallel.layers: CUDA_DEVICE_MAX_CONNECTIONS advice marked given")

        _APPLIED = True
        return True


def define_missing_te_names() -> bool:
    """Without Transformer Engine (on CPU, or a GPU without TE), megatron-core 0.16.1's
    ``transformer/moe/moe_utils.py`` imports ``te_general_gemm`` only inside ``try: import
    transformer_engine`` (line ~34) but ``RouterGatingLinearFunction.forward`` / ``backward``
    test ``te_general_gemm is not None`` (lines ~1192, ~1225): a ``NameError`` on the first MoE
    forward. Defining the name as None takes megatron's own torch path. Not a CUDA shim: applied
    whenever TE is absent (``moe_utils.HAVE_TE`` false), whatever the device; returns whether it
    did anything."""
    moe_utils = importlib.import_module("megatron.core.transformer.moe.moe_utils")
    changed = _mla_without_te()
    if moe_utils.HAVE_TE or hasattr(moe_utils, "te_general_gemm"):
        return changed
    moe_utils.te_general_gemm = None
    _PATCHED.append("transformer.moe.moe_utils.te_general_gemm = None (no Transformer Engine)")
    return True


def _mla_without_te() -> bool:
    """Without Transformer Engine, megatron-core 0.16.1's ``transformer/multi_latent_attention.py``
    still sets ``HAVE_TE = True`` (line ~62: its ``try`` imports megatron's TE extension, which
    then binds ``TELinear`` to a ``MagicMock`` placeholder), and ``MultiLatentAttention.__init__``
    (line ~185) calls ``isinstance(self.linear_proj, TELinear)``: a ``TypeError`` building any MLA
    model on the local path. Setting that module's ``HAVE_TE`` to False when ``TELinear`` is not a
    class takes megatron's own non-TE branch (the check only matters for fp8/fp4)."""
    mla = importlib.import_module("megatron.core.transformer.multi_latent_attention")
    if not mla.HAVE_TE or isinstance(mla.TELinear, type):
        return False
    mla.HAVE_TE = False
    _PATCHED.append("transformer.multi_latent_attention.HAVE_TE = False (TELinear is a "
                    "placeholder without Transformer Engine)")
    return True


def cpu_shims_applied() -> bool:
    return _APPLIED


def shim_report() -> Dict[str, Any]:
    """What was patched, and (with MT_DIALOG_CPU_SHIM_TRACE=1) which redirected sites ran."""
    return {"applied": _APPLIED, "patched": list(_PATCHED), "hits": dict(_TRACE_HITS)}
