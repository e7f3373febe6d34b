"""The model layer: what a causal LM can do (:mod:`.capabilities`), the batch layout it trains in
(:mod:`.layout`), packed attention and mixers (:mod:`.attention`, :mod:`.mixers`, :mod:`.masks`) and the
model-level losses that run the body and the fused head inside the call to the model (:mod:`.losses`)."""
