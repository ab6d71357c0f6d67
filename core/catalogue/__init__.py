"""The promotion catalogue: reward types, promotions and their rewards."""
