"""The optimizers by the names ``train.py``'s ``optim=`` gives them: each name's class and
its states' bits (8: bitsandbytes' blockwise states). ``trainer/registry.py`` adds what the
trainer needs to know of each; ``lorenza.integrations.hf`` takes the same names."""

from lorenza.loren import LOREN
from lorenza.mezo import MeZO
from lorenza.variants import (
    APOLLO,
    AdamW,
    AdaZoSAM,
    APOLLOMini,
    Fira,
    GaLoreAdamW,
    Lorenza,
    LorenzaPlus,
    SAMAdamW,
)

OPTIMIZER_NAMES = {
    "adamw": (AdamW, 32),
    "adamw8bit": (AdamW, 8),
    "galore": (GaLoreAdamW, 32),
    "galore8bit": (GaLoreAdamW, 8),
    "fira": (Fira, 32),
    "apollo": (APOLLO, 32),
    "apollo_mini": (APOLLOMini, 32),
    "lorenza": (Lorenza, 32),
    "lorenza8bit": (Lorenza, 8),
    "lorenza_plus": (LorenzaPlus, 32),
    "adazo_sam": (AdaZoSAM, 32),
    "sam": (SAMAdamW, 32),
    "mezo": (MeZO, 32),
    "loren": (LOREN, 32),
}
