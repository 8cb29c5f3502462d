"""Preference optimisation: DPO and its variants (sigmoid, IPO, SimPO) on judge- or reward-built pairs.

``posttrain pairs`` turns a pairwise judge's verdicts (both orders) or a verifiable reward's scores on sampled
answers into ``prompt``/``chosen``/``rejected`` rows with their provenance (``pairs``); ``posttrain dpo`` trains on
such rows on the training chassis (``config``, ``loss``, ``data``, ``trainer``, ``run``).
"""
