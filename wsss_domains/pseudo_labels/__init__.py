"""pseudo_labels"""
