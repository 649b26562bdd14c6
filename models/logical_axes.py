"""Logical axis names that the networks attach to their parameters.

A parameter says what each of its dimensions means (`"embed"`: the features it reads, `"mlp"`:
the features it writes, `"vocab"`, `"norm"`); `config.mesh.rules` maps these names to mesh axes
(`train.sharding`). The names ride on the NNX Param as `out_sharding` metadata with eager
sharding switched off: modules are created without a mesh (under `eval_shape`, or on the host
for tests and weight loading) and the train setup places every array itself with
`jit(..., out_shardings=...)`.
"""

EMBED = "embed"  # input features of a kernel; the model width of an embedding table
MLP = "mlp"  # output features of a kernel and its bias
VOCAB = "vocab"  # rows of a token / position embedding table
NORM = "norm"  # scale and bias of a normalisation layer

LOGICAL_AXES = (EMBED, MLP, VOCAB, NORM)


def _names(*names):
    return {"out_sharding": tuple(names), "eager_sharding": False}


def linear_kw() -> dict:
    """kernel/bias metadata for nnx.Linear (kernel [in, out])."""
    return {"kernel_metadata": _names(EMBED, MLP), "bias_metadata": _names(MLP)}


def conv_kw() -> dict:
    """kernel/bias metadata for a 2D nnx.Conv (kernel [kh, kw, in, out])."""
    return {"kernel_metadata": _names(None, None, EMBED, MLP), "bias_metadata": _names(MLP)}


def norm_kw() -> dict:
    """scale/bias metadata for nnx.GroupNorm and nnx.LayerNorm."""
    return {"scale_metadata": _names(NORM), "bias_metadata": _names(NORM)}


def embed_kw() -> dict:
    """table metadata for nnx.Embed ([vocab, features])."""
    return {"embedding_metadata": _names(VOCAB, EMBED)}
