"""Readers for the public pixel-annotated PE sets (CAD-PE, FUMPE) into the RSNA-STR PE layout.

``petriage-train import cad-pe|fumpe SRC --out DST`` writes DST in the layout ``read_rsna`` reads
(``train.csv``, ``train/<Study>/<Series>/<SOP>.dcm``, ``masks/<Study>.npz``), so the cache, the
splits and both stages treat an imported set like any other; ``data.train_extra`` adds it to a
training split. The layouts implemented are described in docs/training.md ("Public masked sets").
"""
