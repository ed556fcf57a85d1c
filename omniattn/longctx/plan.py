"""How one call uses the device: chunk size, the resident prefix, the streamed part, the host part.

Budget: K and V on the device (the resident mirror of a prefix of the cache plus, when the cache
does not fit, two streaming buffers of ``chunk`` tokens) never exceed ``gpu_budget_bytes``.

Cooperative decoding splits the context [0, L) into a device part [0, g) (its resident prefix
read at the device's attention bandwidth, the rest streamed over the link) and a host part
[g, L) (attended by the CPU at the same time). With R resident tokens, x streamed and
h = L - R - x on the host, the model says::

    time = max(h * bytes / host_bw,  R * bytes / device_bw + x * bytes / link_bw)

and both sides finish together at x = (T / host_bw - R / device_bw) / (1 / link_bw + 1 / host_bw),
T = L - R, clipped to [0, T].
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

MIN_CHUNK_TOKENS = 16
MAX_DEFAULT_CHUNK_TOKENS = 32768
DEFAULT_QUERY_BLOCK = 32768  # query rows per block in prefill: ~4 x rows FLOP per streamed KV byte


@dataclass(frozen=True)
class Bandwidths:
    """Measured (or given) speeds in GB/s of KV bytes: ``host_gbps`` the CPU attending over host
    memory, ``link_gbps`` pinned host->device copies, ``device_gbps`` the device attending over
    KV already on it."""

    host_gbps: float
    link_gbps: float
    device_gbps: float

    def __post_init__(self):
        for name in ("host_gbps", "link_gbps", "device_gbps"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
                raise ValueError(f"Bandwidths.{name}: expected a number > 0 (GB/s), got {value!r}")


@dataclass(frozen=True)
class Plan:
    bytes_per_token: int
    budget: int  # bytes of K and V the device may hold
    chunk: int  # tokens per streamed chunk
    resident_cap: int  # tokens of the prefix the device mirror may hold
    query_block: int


def make_plan(bytes_per_token: int, length: int, budget: Optional[int], chunk_tokens: Optional[int],
              query_block: Optional[int], default_budget: int) -> Plan:
    if chunk_tokens is not None and (isinstance(chunk_tokens, bool) or not isinstance(chunk_tokens, int)
                                     or chunk_tokens < MIN_CHUNK_TOKENS):
        raise ValueError(f"chunk_tokens: expected an int >= {MIN_CHUNK_TOKENS} (tokens per streamed chunk), "
                         f"got {chunk_tokens!r}")
    if query_block is not None and (isinstance(query_block, bool) or not isinstance(query_block, int)
                                    or query_block < 1):
        raise ValueError(f"query_block: expected an int >= 1 (query rows per block), got {query_block!r}")
    if budget is None:
        budget = default_budget
    elif isinstance(budget, bool) or not isinstance(budget, int) or budget <= 0:
        raise ValueError(f"gpu_budget_bytes: expected an int > 0 (bytes of K and V on the device), got {budget!r}")
    smallest = chunk_tokens or MIN_CHUNK_TOKENS
    if budget < 2 * smallest * bytes_per_token:
        raise ValueError(
            f"gpu_budget_bytes: {budget} bytes is smaller than two chunks of {smallest} tokens "
            f"({2 * smallest * bytes_per_token} bytes at {bytes_per_token} bytes of K and V per token: streaming "
            "double-buffers); raise the budget" + (" or lower chunk_tokens" if chunk_tokens else ""))
    chunk = chunk_tokens or max(MIN_CHUNK_TOKENS, min(MAX_DEFAULT_CHUNK_TOKENS, budget // (16 * bytes_per_token)))
    if length * bytes_per_token <= budget:  # everything fits: a mirror of the whole cache, no streaming
        resident = budget // bytes_per_token
    else:
        resident = (budget - 2 * chunk * bytes_per_token) // bytes_per_token
    return Plan(bytes_per_token, budget, chunk, max(resident, 0), query_block or DEFAULT_QUERY_BLOCK)


@dataclass(frozen=True)
class Split:
    """Tokens [0, resident) resident and [resident, device_end) streamed on the device, the rest on the host."""

    resident: int
    device_end: int
    length: int
    predicted_ms: Optional[float]

    @property
    def streamed(self) -> int:
        return self.device_end - self.resident

    @property
    def host(self) -> int:
        return self.length - self.device_end


def predict_ms(split_resident: int, streamed: int, host: int, bytes_per_token: int, bw: Bandwidths) -> float:
    gb = bytes_per_token / 1e9
    device = split_resident * gb / bw.device_gbps + streamed * gb / bw.link_gbps
    return 1e3 * max(host * gb / bw.host_gbps, device)


def cooperative_split(length: int, resident: int, bytes_per_token: int, bw: Bandwidths, granule: int = 1) -> Split:
    """Where the device part ends so that the device and the host finish together (module docstring)."""
    rest = length - resident
    x = (rest / bw.host_gbps - resident / bw.device_gbps) / (1 / bw.link_gbps + 1 / bw.host_gbps)
    x = int(min(max(x, 0), rest))
    if granule > 1 and x < rest:
        x = x // granule * granule
    return Split(resident, resident + x, length, predict_ms(resident, x, rest - x, bytes_per_token, bw))


# cooperative="auto" cooperates only where the model predicts at most this share of streaming's
# time: coordinating the two sides costs what the model leaves out (1M tokens, H100 host, against
# streaming: sigmoid predicted 0.94 and measured 1.21, SiLU 0.95 and 1.04, both on the float32 host
# path; softmax, fused host path, predicted 0.71 and measured 0.62-0.78)
AUTO_MAX_SHARE = 0.8


def cooperation_pays(split: Split, bytes_per_token: int, bw: Bandwidths) -> bool:
    """Whether a cooperative split is worth its coordination: predicted at most AUTO_MAX_SHARE of
    the time of the device alone (its resident prefix and everything else streamed)."""
    alone = predict_ms(split.resident, split.length - split.resident, 0, bytes_per_token, bw)
    return split.predicted_ms <= AUTO_MAX_SHARE * alone


def device_only_split(length: int, resident: int, bytes_per_token: int, bw: Optional[Bandwidths]) -> Split:
    ms = predict_ms(resident, length - resident, 0, bytes_per_token, bw) if bw else None
    return Split(resident, length, length, ms)


def host_only_split(length: int, bytes_per_token: int, bw: Optional[Bandwidths]) -> Split:
    ms = predict_ms(0, 0, length, bytes_per_token, bw) if bw else None
    return Split(0, 0, length, ms)
