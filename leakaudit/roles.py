"""The three roles a row of a store plays, and the codes ``/split`` stores them as.

An attack trains on ``attacker-train`` rows, selects on ``attacker-validation`` rows and is
scored on ``test`` rows it never saw; a model trained or hardened by leakaudit uses the same
split, so its test rows are unseen too. The codes are part of the store's schema: a row's
role is written as its code, and the names are written beside them.
"""

from __future__ import annotations

from typing import Final

#: The role names, in code order: ``ROLES[code]`` is the name of ``code``.
ROLES: Final = ("attacker-train", "attacker-validation", "test")
#: Name → code.
ROLE_CODES: Final = {name: code for code, name in enumerate(ROLES)}

ATTACKER_TRAIN: Final = ROLE_CODES["attacker-train"]
ATTACKER_VALIDATION: Final = ROLE_CODES["attacker-validation"]
TEST: Final = ROLE_CODES["test"]
