-- Each contact with its ancestors up to four levels, for drill-down filters. Ancestors are
-- looked up in `contact` by parent_uuid: a missing parent keeps its id (parent_N_uuid) but
-- has no name or type, and ends the chain.
SELECT
    c.uuid,
    c.name,
    c.contact_type,
    c.parent_uuid,
    c.parent_uuid AS parent_1_uuid,
    p1.name AS parent_1_name,
    p1.contact_type AS parent_1_type,
    p1.parent_uuid AS parent_2_uuid,
    p2.name AS parent_2_name,
    p2.contact_type AS parent_2_type,
    p2.parent_uuid AS parent_3_uuid,
    p3.name AS parent_3_name,
    p3.contact_type AS parent_3_type,
    p3.parent_uuid AS parent_4_uuid,
    p4.name AS parent_4_name,
    p4.contact_type AS parent_4_type,
    -- the contact itself or its nearest ancestor of that type
    (CASE 'district_hospital'
        WHEN c.contact_type THEN c.uuid WHEN p1.contact_type THEN p1.uuid
        WHEN p2.contact_type THEN p2.uuid WHEN p3.contact_type THEN p3.uuid
        WHEN p4.contact_type THEN p4.uuid END)::text AS district_uuid,
    CASE 'district_hospital'
        WHEN c.contact_type THEN c.name WHEN p1.contact_type THEN p1.name
        WHEN p2.contact_type THEN p2.name WHEN p3.contact_type THEN p3.name
        WHEN p4.contact_type THEN p4.name END AS district_name,
    (CASE 'health_center'
        WHEN c.contact_type THEN c.uuid WHEN p1.contact_type THEN p1.uuid
        WHEN p2.contact_type THEN p2.uuid WHEN p3.contact_type THEN p3.uuid
        WHEN p4.contact_type THEN p4.uuid END)::text AS health_facility_uuid,
    CASE 'health_center'
        WHEN c.contact_type THEN c.name WHEN p1.contact_type THEN p1.name
        WHEN p2.contact_type THEN p2.name WHEN p3.contact_type THEN p3.name
        WHEN p4.contact_type THEN p4.name END AS health_facility_name
FROM contact AS c
LEFT JOIN contact AS p1 ON p1.uuid = c.parent_uuid
LEFT JOIN contact AS p2 ON p2.uuid = p1.parent_uuid
LEFT JOIN contact AS p3 ON p3.uuid = p2.parent_uuid
LEFT JOIN contact AS p4 ON p4.uuid = p3.parent_uuid
