-- Personalized product promotions (seed 003): promotions personalized per customer, the product
-- list each enrolled customer chooses from and their choice, and product-set discounts.

CREATE TABLE personalized_promotions (
    backend_id              text        PRIMARY KEY
                                        CHECK (backend_id ~ '^[A-Za-z0-9][A-Za-z0-9_.\-]{0,99}$'),
    name                    text        NOT NULL CHECK (length(name) BETWEEN 1 AND 200),
    description             text        NOT NULL DEFAULT '',
    -- NULL: the customer may select all the products on their list.
    max_distinct_products   integer     CHECK (max_distinct_products >= 1),
    lock_after_first_apply  boolean     NOT NULL DEFAULT false,
    create_time             timestamptz NOT NULL DEFAULT now(),
    update_time             timestamptz NOT NULL DEFAULT now()
);

-- One row per customer enrolled in a personalized promotion. customer_id is checked against
-- customers in the same transaction by the service (customers are never deleted); no foreign key,
-- so that tooling which truncates customers and events together keeps working.
CREATE TABLE customer_product_lists (
    customer_id          text        NOT NULL CHECK (length(customer_id) BETWEEN 1 AND 128),
    promotion_id         text        NOT NULL
                                     REFERENCES personalized_promotions (backend_id)
                                     ON DELETE CASCADE,
    product_ids          text[]      NOT NULL CHECK (cardinality(product_ids) >= 1),
    default_product_id   text        NOT NULL,
    -- NULL: nothing chosen, discounts use the default product.
    chosen_product_ids   text[]      CHECK (cardinality(chosen_product_ids) >= 1),
    -- Set by the first ApplyBasket in which a discount linked to the promotion applied.
    first_apply_time     timestamptz,
    update_time          timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (customer_id, promotion_id),
    CHECK (default_product_id = ANY (product_ids))
);
CREATE INDEX customer_product_lists_promotion ON customer_product_lists
    (promotion_id, customer_id);

CREATE TABLE product_set_discounts (
    discount_id       text          PRIMARY KEY
                                    CHECK (discount_id ~ '^[A-Za-z0-9][A-Za-z0-9_.\-]{0,99}$'),
    name              text          NOT NULL CHECK (length(name) BETWEEN 1 AND 200),
    discount_type     text          NOT NULL
                                    CHECK (discount_type IN ('PERCENTAGE_OFF', 'AMOUNT_OFF',
                                                             'FIXED_PRICE')),
    value             numeric(20,6) NOT NULL CHECK (value >= 0),
    min_basket_total  numeric(20,6) CHECK (min_basket_total >= 0),
    create_time       timestamptz   NOT NULL DEFAULT now()
);

-- The sets of a discount, in order. A personalized set names its promotion (RESTRICT: a
-- promotion in use by a discount cannot be deleted) and has no product ids of its own.
CREATE TABLE product_set_discount_sets (
    discount_id                text     NOT NULL
                                        REFERENCES product_set_discounts (discount_id)
                                        ON DELETE CASCADE,
    position                   smallint NOT NULL,
    name                       text     NOT NULL,
    product_ids                text[]   NOT NULL DEFAULT '{}',
    personalized_promotion_id  text     REFERENCES personalized_promotions (backend_id)
                                        ON DELETE RESTRICT,
    required_quantity          integer  NOT NULL CHECK (required_quantity >= 1),
    gets_discount              boolean  NOT NULL,
    discounted_quantity        integer  NOT NULL CHECK (discounted_quantity >= 0),
    PRIMARY KEY (discount_id, position)
);
-- Basket evaluation looks discounts up by the basket's products and the customer's promotions.
CREATE INDEX product_set_discount_sets_products ON product_set_discount_sets
    USING gin (product_ids);
CREATE INDEX product_set_discount_sets_promotion ON product_set_discount_sets
    (personalized_promotion_id) WHERE personalized_promotion_id IS NOT NULL;
