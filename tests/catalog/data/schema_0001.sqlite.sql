-- castlib catalog schema at revision 0001 (SQLite), frozen: a future migration is
-- tested against the first schema users really have.

CREATE TABLE alembic_version (
	version_num VARCHAR(32) NOT NULL, 
	CONSTRAINT alembic_version_pkc PRIMARY KEY (version_num)
);
CREATE TABLE nodes (
	id INTEGER NOT NULL, 
	scheme VARCHAR(32) NOT NULL, 
	host VARCHAR(255) NOT NULL, 
	PRIMARY KEY (id), 
	CONSTRAINT uq_nodes_scheme_host UNIQUE (scheme, host)
);
CREATE TABLE locations (
	id INTEGER NOT NULL, 
	node_id INTEGER NOT NULL, 
	url TEXT NOT NULL, 
	root_path TEXT NOT NULL, 
	name VARCHAR(255), 
	created_at DATETIME NOT NULL, 
	indexed_at DATETIME, 
	PRIMARY KEY (id), 
	FOREIGN KEY(node_id) REFERENCES nodes (id), 
	UNIQUE (url), 
	UNIQUE (name)
);
CREATE TABLE entries (
	id INTEGER NOT NULL, 
	location_id INTEGER NOT NULL, 
	path TEXT NOT NULL, 
	parent_id INTEGER, 
	name TEXT NOT NULL, 
	kind VARCHAR(1) NOT NULL, 
	size BIGINT, 
	mtime_ns BIGINT, 
	mode INTEGER, 
	link_target TEXT, 
	adler32 VARCHAR(8), 
	md5 VARCHAR(32), 
	sha256 VARCHAR(64), 
	online BOOLEAN, 
	first_seen DATETIME NOT NULL, 
	last_seen DATETIME NOT NULL, 
	deleted BOOLEAN DEFAULT 0 NOT NULL, 
	PRIMARY KEY (id), 
	CONSTRAINT uq_entries_location_path UNIQUE (location_id, path), 
	FOREIGN KEY(location_id) REFERENCES locations (id) ON DELETE CASCADE
);
CREATE INDEX ix_entries_parent ON entries (parent_id);
CREATE TABLE runs (
	id INTEGER NOT NULL, 
	command VARCHAR(64) NOT NULL, 
	pipeline TEXT, 
	args JSON, 
	hostname VARCHAR(255), 
	username VARCHAR(255), 
	pid INTEGER, 
	started_at DATETIME NOT NULL, 
	finished_at DATETIME, 
	status VARCHAR(16) NOT NULL, 
	error TEXT, 
	PRIMARY KEY (id)
);
CREATE TABLE stage_results (
	id INTEGER NOT NULL, 
	run_id INTEGER NOT NULL, 
	position INTEGER NOT NULL, 
	stage VARCHAR(64) NOT NULL, 
	stage_id VARCHAR(255), 
	params JSON, 
	status VARCHAR(16) NOT NULL, 
	counts JSON, 
	errors JSON, 
	started_at DATETIME NOT NULL, 
	finished_at DATETIME, 
	PRIMARY KEY (id), 
	FOREIGN KEY(run_id) REFERENCES runs (id) ON DELETE CASCADE
);
CREATE INDEX ix_stage_results_run ON stage_results (run_id);
INSERT INTO alembic_version (version_num) VALUES ('0001');
