"""The store's upkeep: how much room it takes (:mod:`.usage`) and the chores run once per
period across every process that shares it (:mod:`.periods`)."""
