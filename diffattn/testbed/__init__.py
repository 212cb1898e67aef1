"""Small models trained on real images offline, and the quality metrics methods are judged by."""
