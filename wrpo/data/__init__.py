"""The data layer: preference rows (:mod:`.preference`), SFT rows (:mod:`.sft`), batches of groups
(:mod:`.collate`), and building WRPO data from samples and scores (:mod:`.construct`)."""
