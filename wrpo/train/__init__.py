"""The training layer: options (:mod:`.config`), the loss step both trainers share (:mod:`.core`), the
transformers trainer (:mod:`.trainer`), exact accumulation, the alpha schedule, checkpoints and one stage
end to end (:mod:`.stage`)."""
