"""Preference optimisation: DPO and its variants (sigmoid, IPO, SimPO) on judge- or reward-built pairs.

``posttrain pairs`` samples answers with the native engine and turns a pairwise judge's verdicts (both orders)
or a verifiable reward's scores into ``prompt``/``chosen``/``rejected`` rows with their provenance;
``posttrain dpo`` trains on such rows with SFT's accelerate, packing and checkpoint machinery. Modules:
``config`` (recipes), ``loss`` (the losses, per pair), ``data`` (rows, tokens, micro-batches), ``trainer``
(the loop), ``run`` (a run from a recipe), ``pairs`` (pair building), ``cli``/``pairs_cli`` (the commands).
"""

from posttrain.dpo.config import DpoConfig, PairsConfig, PreferenceLossSettings
from posttrain.dpo.loss import PairLogps, preference_loss

__all__ = ["DpoConfig", "PairLogps", "PairsConfig", "PreferenceLossSettings", "preference_loss"]
