# "w/o modulation" (Table 1): z enters the UNet only through the noise-level embedding, as one
# global signal, instead of modulating each layer with its own section (§3.2.1).
cond = "emb"
