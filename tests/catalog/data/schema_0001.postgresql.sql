-- castlib catalog schema at revision 0001 (PostgreSQL, pg_dump --schema-only), frozen:
-- a future migration is tested against the first schema users really have.
SET statement_timeout = 0;
SET lock_timeout = 0;
SET idle_in_transaction_session_timeout = 0;
SET client_encoding = 'UTF8';
SET standard_conforming_strings = on;
SET check_function_bodies = false;
SET xmloption = content;
SET client_min_messages = warning;
SET row_security = off;

SET default_tablespace = '';

SET default_table_access_method = heap;

CREATE TABLE public.alembic_version (
    version_num character varying(32) NOT NULL
);

CREATE TABLE public.entries (
    id bigint NOT NULL,
    location_id integer NOT NULL,
    path text NOT NULL COLLATE pg_catalog."C",
    parent_id bigint,
    name text NOT NULL COLLATE pg_catalog."C",
    kind character varying(1) NOT NULL,
    size bigint,
    mtime_ns bigint,
    mode integer,
    link_target text,
    adler32 character varying(8),
    md5 character varying(32),
    sha256 character varying(64),
    online boolean,
    first_seen timestamp with time zone NOT NULL,
    last_seen timestamp with time zone NOT NULL,
    deleted boolean DEFAULT false NOT NULL
);

CREATE SEQUENCE public.entries_id_seq
    START WITH 1
    INCREMENT BY 1
    NO MINVALUE
    NO MAXVALUE
    CACHE 1;

ALTER SEQUENCE public.entries_id_seq OWNED BY public.entries.id;

CREATE TABLE public.locations (
    id integer NOT NULL,
    node_id integer NOT NULL,
    url text NOT NULL COLLATE pg_catalog."C",
    root_path text NOT NULL COLLATE pg_catalog."C",
    name character varying(255),
    created_at timestamp with time zone NOT NULL,
    indexed_at timestamp with time zone
);

CREATE SEQUENCE public.locations_id_seq
    AS integer
    START WITH 1
    INCREMENT BY 1
    NO MINVALUE
    NO MAXVALUE
    CACHE 1;

ALTER SEQUENCE public.locations_id_seq OWNED BY public.locations.id;

CREATE TABLE public.nodes (
    id integer NOT NULL,
    scheme character varying(32) NOT NULL,
    host character varying(255) NOT NULL
);

CREATE SEQUENCE public.nodes_id_seq
    AS integer
    START WITH 1
    INCREMENT BY 1
    NO MINVALUE
    NO MAXVALUE
    CACHE 1;

ALTER SEQUENCE public.nodes_id_seq OWNED BY public.nodes.id;

CREATE TABLE public.runs (
    id integer NOT NULL,
    command character varying(64) NOT NULL,
    pipeline text,
    args json,
    hostname character varying(255),
    username character varying(255),
    pid integer,
    started_at timestamp with time zone NOT NULL,
    finished_at timestamp with time zone,
    status character varying(16) NOT NULL,
    error text
);

CREATE SEQUENCE public.runs_id_seq
    AS integer
    START WITH 1
    INCREMENT BY 1
    NO MINVALUE
    NO MAXVALUE
    CACHE 1;

ALTER SEQUENCE public.runs_id_seq OWNED BY public.runs.id;

CREATE TABLE public.stage_results (
    id integer NOT NULL,
    run_id integer NOT NULL,
    "position" integer NOT NULL,
    stage character varying(64) NOT NULL,
    stage_id character varying(255),
    params json,
    status character varying(16) NOT NULL,
    counts json,
    errors json,
    started_at timestamp with time zone NOT NULL,
    finished_at timestamp with time zone
);

CREATE SEQUENCE public.stage_results_id_seq
    AS integer
    START WITH 1
    INCREMENT BY 1
    NO MINVALUE
    NO MAXVALUE
    CACHE 1;

ALTER SEQUENCE public.stage_results_id_seq OWNED BY public.stage_results.id;

ALTER TABLE ONLY public.entries ALTER COLUMN id SET DEFAULT nextval('public.entries_id_seq'::regclass);

ALTER TABLE ONLY public.locations ALTER COLUMN id SET DEFAULT nextval('public.locations_id_seq'::regclass);

ALTER TABLE ONLY public.nodes ALTER COLUMN id SET DEFAULT nextval('public.nodes_id_seq'::regclass);

ALTER TABLE ONLY public.runs ALTER COLUMN id SET DEFAULT nextval('public.runs_id_seq'::regclass);

ALTER TABLE ONLY public.stage_results ALTER COLUMN id SET DEFAULT nextval('public.stage_results_id_seq'::regclass);

ALTER TABLE ONLY public.alembic_version
    ADD CONSTRAINT alembic_version_pkc PRIMARY KEY (version_num);

ALTER TABLE ONLY public.entries
    ADD CONSTRAINT entries_pkey PRIMARY KEY (id);

ALTER TABLE ONLY public.locations
    ADD CONSTRAINT locations_name_key UNIQUE (name);

ALTER TABLE ONLY public.locations
    ADD CONSTRAINT locations_pkey PRIMARY KEY (id);

ALTER TABLE ONLY public.locations
    ADD CONSTRAINT locations_url_key UNIQUE (url);

ALTER TABLE ONLY public.nodes
    ADD CONSTRAINT nodes_pkey PRIMARY KEY (id);

ALTER TABLE ONLY public.runs
    ADD CONSTRAINT runs_pkey PRIMARY KEY (id);

ALTER TABLE ONLY public.stage_results
    ADD CONSTRAINT stage_results_pkey PRIMARY KEY (id);

ALTER TABLE ONLY public.entries
    ADD CONSTRAINT uq_entries_location_path UNIQUE (location_id, path);

ALTER TABLE ONLY public.nodes
    ADD CONSTRAINT uq_nodes_scheme_host UNIQUE (scheme, host);

CREATE INDEX ix_entries_parent ON public.entries USING btree (parent_id);

CREATE INDEX ix_stage_results_run ON public.stage_results USING btree (run_id);

ALTER TABLE ONLY public.entries
    ADD CONSTRAINT entries_location_id_fkey FOREIGN KEY (location_id) REFERENCES public.locations(id) ON DELETE CASCADE;

ALTER TABLE ONLY public.locations
    ADD CONSTRAINT locations_node_id_fkey FOREIGN KEY (node_id) REFERENCES public.nodes(id);

ALTER TABLE ONLY public.stage_results
    ADD CONSTRAINT stage_results_run_id_fkey FOREIGN KEY (run_id) REFERENCES public.runs(id) ON DELETE CASCADE;

INSERT INTO public.alembic_version (version_num) VALUES ('0001');
