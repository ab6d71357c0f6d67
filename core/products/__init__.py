"""Personalized product promotions (seed 003).

A customer is enrolled in a personalized promotion with a product list made for them and chooses
products from it (``promotions``); a product-set discount (``discounts``) then applies to what they
chose when they buy (``basket``), with amounts spread over basket lines to the cent
(``allocation``). Pure: no I/O, no clock; callers pass in what was stored.
"""
