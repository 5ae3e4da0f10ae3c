--
-- PostgreSQL database dump
--

\restrict pzZ0eLwfYR7bwsAmgXPTr3ss8vEelPYyig5t8WZAMFVpZxg5Fe1tNMlUwughTLj

-- Dumped from database version 15.20 (Debian 15.20-0+deb12u1)
-- Dumped by pg_dump version 15.20 (Debian 15.20-0+deb12u1)

SET statement_timeout = 0;
SET lock_timeout = 0;
SET idle_in_transaction_session_timeout = 0;
SET client_encoding = 'UTF8';
SET standard_conforming_strings = on;
SELECT pg_catalog.set_config('search_path', '', false);
SET check_function_bodies = false;
SET xmloption = content;
SET client_min_messages = warning;
SET row_security = off;

SET default_tablespace = '';

SET default_table_access_method = heap;

--
-- Name: _sqlx_migrations; Type: TABLE; Schema: public; Owner: -
--

CREATE TABLE public._sqlx_migrations (
    version bigint NOT NULL,
    description text NOT NULL,
    installed_on timestamp with time zone DEFAULT now() NOT NULL,
    success boolean NOT NULL,
    checksum bytea NOT NULL,
    execution_time bigint NOT NULL
);


--
-- Name: agents; Type: TABLE; Schema: public; Owner: -
--

CREATE TABLE public.agents (
    id text NOT NULL,
    site_id text NOT NULL,
    fingerprint text NOT NULL,
    secret_hash text NOT NULL,
    hostname text NOT NULL,
    version text NOT NULL,
    os text NOT NULL,
    arch text NOT NULL,
    channel text,
    paused boolean DEFAULT false NOT NULL,
    auto_update boolean DEFAULT true NOT NULL,
    enrolled_at bigint NOT NULL,
    last_seen bigint NOT NULL,
    node_id text
);


--
-- Name: api_tokens; Type: TABLE; Schema: public; Owner: -
--

CREATE TABLE public.api_tokens (
    id text NOT NULL,
    name text NOT NULL,
    role text NOT NULL,
    token_hash text NOT NULL,
    created_at bigint NOT NULL,
    revoked_at bigint,
    CONSTRAINT api_tokens_role_check CHECK ((role = ANY (ARRAY['viewer'::text, 'operator'::text, 'admin'::text])))
);


--
-- Name: audit_log; Type: TABLE; Schema: public; Owner: -
--

CREATE TABLE public.audit_log (
    id bigint NOT NULL,
    at bigint NOT NULL,
    actor text NOT NULL,
    action text NOT NULL,
    target text NOT NULL,
    detail text,
    result text NOT NULL
);


--
-- Name: audit_log_id_seq; Type: SEQUENCE; Schema: public; Owner: -
--

CREATE SEQUENCE public.audit_log_id_seq
    START WITH 1
    INCREMENT BY 1
    NO MINVALUE
    NO MAXVALUE
    CACHE 1;


--
-- Name: audit_log_id_seq; Type: SEQUENCE OWNED BY; Schema: public; Owner: -
--

ALTER SEQUENCE public.audit_log_id_seq OWNED BY public.audit_log.id;


--
-- Name: clients; Type: TABLE; Schema: public; Owner: -
--

CREATE TABLE public.clients (
    id text NOT NULL,
    name text NOT NULL,
    channel text,
    created_at bigint NOT NULL
);


--
-- Name: enrollment_tokens; Type: TABLE; Schema: public; Owner: -
--

CREATE TABLE public.enrollment_tokens (
    id text NOT NULL,
    site_id text NOT NULL,
    token_hash text NOT NULL,
    created_at bigint NOT NULL,
    revoked_at bigint,
    expires_at bigint,
    max_uses bigint,
    uses bigint DEFAULT 0 NOT NULL
);


--
-- Name: nodes; Type: TABLE; Schema: public; Owner: -
--

CREATE TABLE public.nodes (
    id text NOT NULL,
    address text NOT NULL,
    started_at bigint NOT NULL,
    last_beat bigint NOT NULL
);


--
-- Name: rollouts; Type: TABLE; Schema: public; Owner: -
--

CREATE TABLE public.rollouts (
    version text NOT NULL,
    os text NOT NULL,
    arch text NOT NULL,
    first_seen bigint NOT NULL,
    promoted_at bigint,
    halted_at bigint,
    halt_reason text
);


--
-- Name: settings; Type: TABLE; Schema: public; Owner: -
--

CREATE TABLE public.settings (
    key text NOT NULL,
    value text NOT NULL
);


--
-- Name: sites; Type: TABLE; Schema: public; Owner: -
--

CREATE TABLE public.sites (
    id text NOT NULL,
    client_id text NOT NULL,
    name text NOT NULL,
    channel text,
    created_at bigint NOT NULL
);


--
-- Name: update_tasks; Type: TABLE; Schema: public; Owner: -
--

CREATE TABLE public.update_tasks (
    id text NOT NULL,
    agent_id text NOT NULL,
    from_version text NOT NULL,
    to_version text NOT NULL,
    os text NOT NULL,
    arch text NOT NULL,
    kind text NOT NULL,
    status text NOT NULL,
    attempts bigint DEFAULT 0 NOT NULL,
    error text,
    bytes_done bigint DEFAULT 0 NOT NULL,
    bytes_total bigint DEFAULT 0 NOT NULL,
    created_at bigint NOT NULL,
    updated_at bigint NOT NULL,
    dispatched_at bigint,
    progress_at bigint,
    seq bigint NOT NULL,
    CONSTRAINT update_tasks_kind_check CHECK ((kind = ANY (ARRAY['update'::text, 'forced'::text, 'rollback'::text]))),
    CONSTRAINT update_tasks_status_check CHECK ((status = ANY (ARRAY['queued'::text, 'dispatched'::text, 'downloading'::text, 'verifying'::text, 'installing'::text, 'restarting'::text, 'succeeded'::text, 'failed'::text, 'rolled_back'::text, 'cancelled'::text, 'timed_out'::text])))
);


--
-- Name: update_tasks_seq_seq; Type: SEQUENCE; Schema: public; Owner: -
--

ALTER TABLE public.update_tasks ALTER COLUMN seq ADD GENERATED ALWAYS AS IDENTITY (
    SEQUENCE NAME public.update_tasks_seq_seq
    START WITH 1
    INCREMENT BY 1
    NO MINVALUE
    NO MAXVALUE
    CACHE 1
);


--
-- Name: version_blocks; Type: TABLE; Schema: public; Owner: -
--

CREATE TABLE public.version_blocks (
    version text NOT NULL,
    reason text NOT NULL,
    created_at bigint NOT NULL
);


--
-- Name: version_snapshots; Type: TABLE; Schema: public; Owner: -
--

CREATE TABLE public.version_snapshots (
    at bigint NOT NULL,
    os text NOT NULL,
    arch text NOT NULL,
    version text NOT NULL,
    agents bigint NOT NULL
);


--
-- Name: audit_log id; Type: DEFAULT; Schema: public; Owner: -
--

ALTER TABLE ONLY public.audit_log ALTER COLUMN id SET DEFAULT nextval('public.audit_log_id_seq'::regclass);


--
-- Data for Name: _sqlx_migrations; Type: TABLE DATA; Schema: public; Owner: -
--

COPY public._sqlx_migrations (version, description, installed_on, success, checksum, execution_time) FROM stdin;
1	foundation	2026-11-29 05:04:54.763136+00	t	\\xb0199d8e2c208f6ace8b99a6b66101aacf5c2f33b03c64990b1accfa3f5d3c6c443af1124eb96ed33ef9757927748c57	12548436
2	update engine	2026-11-29 05:04:54.77614+00	t	\\x1ac013b55fed73695efce116f8bb34ae2b1ca6579457fe53892dea5737a29051f5d89201074835ade3c447e586911a49	7452982
3	operator workflows	2026-11-29 05:04:54.783867+00	t	\\x4afca7a47d9a0635200a80b0ff0c8d9f2b86fa4e0b6933bf092f7e9ef788d881d7b5e859ab400cf580b98587f171ec4a	5218377
4	nodes	2026-11-29 05:04:54.789363+00	t	\\xb0c985600a4404cb05e6eee19bef3f51327ff70ab30d9f0ffa557f210be22dd68a70bf69631eba94e34b65dc13dd34b1	2255586
5	version snapshots	2026-11-29 05:04:54.791849+00	t	\\xb83d56c3eeca523db1b5fb338a24c34575d2a5430e4df32fa1b9a172b3514c848b471ce6576648c40a8f70d16de64252	2229998
\.


--
-- Data for Name: agents; Type: TABLE DATA; Schema: public; Owner: -
--

COPY public.agents (id, site_id, fingerprint, secret_hash, hostname, version, os, arch, channel, paused, auto_update, enrolled_at, last_seen, node_id) FROM stdin;
1b9de900-ddbd-43d1-b4ad-62888269e6d6	63fc229b-ceae-4d5c-9932-46b963259c48	sim-2	410fc2f8f0c902cd98379fb9a9331232fddc32044ff02b67a30b886f73d56859	sim-2	1.1.0	linux	amd64	\N	f	t	1795928694965	1795928713347	\N
36ff8228-beaa-4b3b-a456-885cd675eedf	63fc229b-ceae-4d5c-9932-46b963259c48	sim-3	fffcc648dc0f18b17fa510547bbbd36470606db8edc732533fa8757b9fc5cc27	sim-3	1.1.0	linux	amd64	\N	f	t	1795928694966	1795928713792	\N
8ab7826a-b344-4628-82d5-80e7df205167	63fc229b-ceae-4d5c-9932-46b963259c48	sim-4	7b51bd0a084b84fe380cd1026abb101fb37a66769be06cb7e48116b12581256f	sim-4	1.1.0	linux	amd64	\N	f	t	1795928694967	1795928714013	\N
0224c5e3-898e-4107-a53c-32ed0dd5b413	63fc229b-ceae-4d5c-9932-46b963259c48	sim-5	e50a3a34cde499027e2697287443081db6259e9c7d8ceb64d5dc8fa86d4c84f2	sim-5	1.1.0	linux	amd64	\N	f	t	1795928694965	1795928714261	\N
90051bca-ba19-49dd-81f7-3cb4ea90bac2	63fc229b-ceae-4d5c-9932-46b963259c48	sim-1	40c4bce089b7da9c53eef61bfe2ea29ea45f388d46f8db90ea3aad9ed14e3710	sim-1	1.1.0	linux	amd64	\N	t	t	1795928694965	1795928714192	\N
e3010ffe-d65c-4865-956e-ca7ef83e2cb2	63fc229b-ceae-4d5c-9932-46b963259c48	sim-0	2efb943b733b49317078aef8a406da258d9fc68e4606f2a243c8c2774271b69c	sim-0	1.1.0	linux	amd64	beta	f	t	1795928694965	1795928713962	\N
\.


--
-- Data for Name: api_tokens; Type: TABLE DATA; Schema: public; Owner: -
--

COPY public.api_tokens (id, name, role, token_hash, created_at, revoked_at) FROM stdin;
de95865e-e4cf-4202-be5c-058ee58cb43e	bootstrap admin	admin	2759f7f0ef089792c5b74330adaeeab6cf1690a75ea5aa3f1111c2d5f978cbe8	1795928694799	\N
\.


--
-- Data for Name: audit_log; Type: TABLE DATA; Schema: public; Owner: -
--

COPY public.audit_log (id, at, actor, action, target, detail, result) FROM stdin;
1	1795928698052	bootstrap admin (de95865e-e4cf-4202-be5c-058ee58cb43e)	agent.channel	e3010ffe-d65c-4865-956e-ca7ef83e2cb2	beta	1 agents affected
2	1795928698064	bootstrap admin (de95865e-e4cf-4202-be5c-058ee58cb43e)	client.create	2481717d-9632-46f4-809b-8e9a08be1b8b	Second client	created
3	1795928698141	bootstrap admin (de95865e-e4cf-4202-be5c-058ee58cb43e)	site.create	349fe3d2-9bc7-4ea2-8f42-a38fc40ea580	Depot	created
4	1795928698158	bootstrap admin (de95865e-e4cf-4202-be5c-058ee58cb43e)	releases.rescan	downloads	2 offered, 0 skipped	done
5	1795928702174	bootstrap admin (de95865e-e4cf-4202-be5c-058ee58cb43e)	rollout.promote	1.1.0	1 of the 3 beta successes needed (0 failed) (1 builds)	promoted (forced past the health gate)
6	1795928707193	bootstrap admin (de95865e-e4cf-4202-be5c-058ee58cb43e)	releases.rescan	downloads	3 offered, 0 skipped	done
7	1795928707212	drover	rollout.halt	1.2.0 linux/amd64	5 of 5 attempts failed (100%, over the 20% limit)	halted
8	1795928713293	bootstrap admin (de95865e-e4cf-4202-be5c-058ee58cb43e)	agent.pause	90051bca-ba19-49dd-81f7-3cb4ea90bac2	\N	done
\.


--
-- Data for Name: clients; Type: TABLE DATA; Schema: public; Owner: -
--

COPY public.clients (id, name, channel, created_at) FROM stdin;
fc9c6b38-0688-49d0-855c-c851d5fcce6e	default	\N	1795928694799
2481717d-9632-46f4-809b-8e9a08be1b8b	Second client	\N	1795928698064
\.


--
-- Data for Name: enrollment_tokens; Type: TABLE DATA; Schema: public; Owner: -
--

COPY public.enrollment_tokens (id, site_id, token_hash, created_at, revoked_at, expires_at, max_uses, uses) FROM stdin;
ca4caf53-b74a-4ae1-88ec-0201f8d8c789	63fc229b-ceae-4d5c-9932-46b963259c48	6316dc37aa4e8f2a7c4039746055b0861a5d7cb06dcbcd0004fb74b613f75d04	1795928694799	\N	\N	\N	6
\.


--
-- Data for Name: nodes; Type: TABLE DATA; Schema: public; Owner: -
--

COPY public.nodes (id, address, started_at, last_beat) FROM stdin;
971cbe82-c158-4e24-bc9d-0dcc2b5e1cb8	http://127.0.0.1:36819	1795928694806	1795928709808
\.


--
-- Data for Name: rollouts; Type: TABLE DATA; Schema: public; Owner: -
--

COPY public.rollouts (version, os, arch, first_seen, promoted_at, halted_at, halt_reason) FROM stdin;
1.0.0	linux	amd64	1795928695262	\N	\N	\N
1.1.0	linux	amd64	1795928698158	1795928702172	\N	\N
1.2.0	linux	amd64	1795928707193	\N	1795928707210	5 of 5 attempts failed (100%, over the 20% limit)
\.


--
-- Data for Name: settings; Type: TABLE DATA; Schema: public; Owner: -
--

COPY public.settings (key, value) FROM stdin;
\.


--
-- Data for Name: sites; Type: TABLE DATA; Schema: public; Owner: -
--

COPY public.sites (id, client_id, name, channel, created_at) FROM stdin;
63fc229b-ceae-4d5c-9932-46b963259c48	fc9c6b38-0688-49d0-855c-c851d5fcce6e	default	\N	1795928694799
349fe3d2-9bc7-4ea2-8f42-a38fc40ea580	2481717d-9632-46f4-809b-8e9a08be1b8b	Depot	\N	1795928698140
\.


--
-- Data for Name: update_tasks; Type: TABLE DATA; Schema: public; Owner: -
--

COPY public.update_tasks (id, agent_id, from_version, to_version, os, arch, kind, status, attempts, error, bytes_done, bytes_total, created_at, updated_at, dispatched_at, progress_at, seq) FROM stdin;
4a8cee5c-758e-4297-b3cc-3ccfd95a63c4	e3010ffe-d65c-4865-956e-ca7ef83e2cb2	1.0.0	1.1.0	linux	amd64	update	succeeded	1	\N	4096	4096	1795928698160	1795928698171	1795928698160	1795928698167	1
7687e2f0-8e7e-47fa-a891-d23fc9b2d4ef	8ab7826a-b344-4628-82d5-80e7df205167	1.0.0	1.1.0	linux	amd64	update	succeeded	1	\N	4096	4096	1795928702177	1795928702197	1795928702177	1795928702191	6
b3e37869-2456-4947-a7d6-6ab18711bd79	36ff8228-beaa-4b3b-a456-885cd675eedf	1.0.0	1.1.0	linux	amd64	update	succeeded	1	\N	4096	4096	1795928702174	1795928702204	1795928702174	1795928702183	2
a730d3b7-abee-4a37-8cae-c80c7dd3b057	1b9de900-ddbd-43d1-b4ad-62888269e6d6	1.0.0	1.1.0	linux	amd64	update	succeeded	1	\N	4096	4096	1795928702177	1795928702206	1795928702177	1795928702193	4
9432ece7-946e-43aa-bdc5-220a667f616f	90051bca-ba19-49dd-81f7-3cb4ea90bac2	1.0.0	1.1.0	linux	amd64	update	succeeded	1	\N	4096	4096	1795928702177	1795928702208	1795928702177	1795928702191	5
42750978-736f-4d3b-bb03-5cc7ba1be0b1	0224c5e3-898e-4107-a53c-32ed0dd5b413	1.0.0	1.1.0	linux	amd64	update	succeeded	1	\N	4096	4096	1795928702177	1795928702239	1795928702177	1795928702234	3
9aebc958-9f93-49f6-8c0d-17bd7a95b3d6	36ff8228-beaa-4b3b-a456-885cd675eedf	1.1.0	1.2.0	linux	amd64	update	rolled_back	1	simulated probation failure of 1.2.0	4096	4096	1795928707194	1795928707207	1795928707194	1795928707205	7
c91957cc-7a73-4834-8cee-ad71fedced3e	8ab7826a-b344-4628-82d5-80e7df205167	1.1.0	1.2.0	linux	amd64	update	rolled_back	1	simulated probation failure of 1.2.0	4096	4096	1795928707198	1795928707207	1795928707198	1795928707206	11
bd410ef9-05fb-4431-a985-d51f63cf7e2a	1b9de900-ddbd-43d1-b4ad-62888269e6d6	1.1.0	1.2.0	linux	amd64	update	rolled_back	1	simulated probation failure of 1.2.0	4096	4096	1795928707198	1795928707208	1795928707198	1795928707206	8
4c4df5c3-8b8f-4f3d-b0fa-5c65760a7a3b	90051bca-ba19-49dd-81f7-3cb4ea90bac2	1.1.0	1.2.0	linux	amd64	update	rolled_back	1	simulated probation failure of 1.2.0	4096	4096	1795928707198	1795928707208	1795928707198	1795928707206	9
185cb9b0-0f08-4f88-97ee-87149fe1cb01	e3010ffe-d65c-4865-956e-ca7ef83e2cb2	1.1.0	1.2.0	linux	amd64	update	rolled_back	1	simulated probation failure of 1.2.0	4096	4096	1795928707198	1795928707208	1795928707198	1795928707207	10
426a1abb-a9b0-48ab-a08d-3b0307960f17	0224c5e3-898e-4107-a53c-32ed0dd5b413	1.1.0	1.2.0	linux	amd64	update	rolled_back	1	simulated probation failure of 1.2.0	4096	4096	1795928707198	1795928707249	1795928707198	1795928707248	12
\.


--
-- Data for Name: version_blocks; Type: TABLE DATA; Schema: public; Owner: -
--

COPY public.version_blocks (version, reason, created_at) FROM stdin;
\.


--
-- Data for Name: version_snapshots; Type: TABLE DATA; Schema: public; Owner: -
--

COPY public.version_snapshots (at, os, arch, version, agents) FROM stdin;
\.


--
-- Name: audit_log_id_seq; Type: SEQUENCE SET; Schema: public; Owner: -
--

SELECT pg_catalog.setval('public.audit_log_id_seq', 8, true);


--
-- Name: update_tasks_seq_seq; Type: SEQUENCE SET; Schema: public; Owner: -
--

SELECT pg_catalog.setval('public.update_tasks_seq_seq', 12, true);


--
-- Name: _sqlx_migrations _sqlx_migrations_pkey; Type: CONSTRAINT; Schema: public; Owner: -
--

ALTER TABLE ONLY public._sqlx_migrations
    ADD CONSTRAINT _sqlx_migrations_pkey PRIMARY KEY (version);


--
-- Name: agents agents_pkey; Type: CONSTRAINT; Schema: public; Owner: -
--

ALTER TABLE ONLY public.agents
    ADD CONSTRAINT agents_pkey PRIMARY KEY (id);


--
-- Name: agents agents_site_id_fingerprint_key; Type: CONSTRAINT; Schema: public; Owner: -
--

ALTER TABLE ONLY public.agents
    ADD CONSTRAINT agents_site_id_fingerprint_key UNIQUE (site_id, fingerprint);


--
-- Name: api_tokens api_tokens_pkey; Type: CONSTRAINT; Schema: public; Owner: -
--

ALTER TABLE ONLY public.api_tokens
    ADD CONSTRAINT api_tokens_pkey PRIMARY KEY (id);


--
-- Name: api_tokens api_tokens_token_hash_key; Type: CONSTRAINT; Schema: public; Owner: -
--

ALTER TABLE ONLY public.api_tokens
    ADD CONSTRAINT api_tokens_token_hash_key UNIQUE (token_hash);


--
-- Name: audit_log audit_log_pkey; Type: CONSTRAINT; Schema: public; Owner: -
--

ALTER TABLE ONLY public.audit_log
    ADD CONSTRAINT audit_log_pkey PRIMARY KEY (id);


--
-- Name: clients clients_name_key; Type: CONSTRAINT; Schema: public; Owner: -
--

ALTER TABLE ONLY public.clients
    ADD CONSTRAINT clients_name_key UNIQUE (name);


--
-- Name: clients clients_pkey; Type: CONSTRAINT; Schema: public; Owner: -
--

ALTER TABLE ONLY public.clients
    ADD CONSTRAINT clients_pkey PRIMARY KEY (id);


--
-- Name: enrollment_tokens enrollment_tokens_pkey; Type: CONSTRAINT; Schema: public; Owner: -
--

ALTER TABLE ONLY public.enrollment_tokens
    ADD CONSTRAINT enrollment_tokens_pkey PRIMARY KEY (id);


--
-- Name: enrollment_tokens enrollment_tokens_token_hash_key; Type: CONSTRAINT; Schema: public; Owner: -
--

ALTER TABLE ONLY public.enrollment_tokens
    ADD CONSTRAINT enrollment_tokens_token_hash_key UNIQUE (token_hash);


--
-- Name: nodes nodes_pkey; Type: CONSTRAINT; Schema: public; Owner: -
--

ALTER TABLE ONLY public.nodes
    ADD CONSTRAINT nodes_pkey PRIMARY KEY (id);


--
-- Name: rollouts rollouts_pkey; Type: CONSTRAINT; Schema: public; Owner: -
--

ALTER TABLE ONLY public.rollouts
    ADD CONSTRAINT rollouts_pkey PRIMARY KEY (version, os, arch);


--
-- Name: settings settings_pkey; Type: CONSTRAINT; Schema: public; Owner: -
--

ALTER TABLE ONLY public.settings
    ADD CONSTRAINT settings_pkey PRIMARY KEY (key);


--
-- Name: sites sites_client_id_name_key; Type: CONSTRAINT; Schema: public; Owner: -
--

ALTER TABLE ONLY public.sites
    ADD CONSTRAINT sites_client_id_name_key UNIQUE (client_id, name);


--
-- Name: sites sites_pkey; Type: CONSTRAINT; Schema: public; Owner: -
--

ALTER TABLE ONLY public.sites
    ADD CONSTRAINT sites_pkey PRIMARY KEY (id);


--
-- Name: update_tasks update_tasks_pkey; Type: CONSTRAINT; Schema: public; Owner: -
--

ALTER TABLE ONLY public.update_tasks
    ADD CONSTRAINT update_tasks_pkey PRIMARY KEY (id);


--
-- Name: version_blocks version_blocks_pkey; Type: CONSTRAINT; Schema: public; Owner: -
--

ALTER TABLE ONLY public.version_blocks
    ADD CONSTRAINT version_blocks_pkey PRIMARY KEY (version);


--
-- Name: version_snapshots version_snapshots_pkey; Type: CONSTRAINT; Schema: public; Owner: -
--

ALTER TABLE ONLY public.version_snapshots
    ADD CONSTRAINT version_snapshots_pkey PRIMARY KEY (at, os, arch, version);


--
-- Name: agents_site; Type: INDEX; Schema: public; Owner: -
--

CREATE INDEX agents_site ON public.agents USING btree (site_id);


--
-- Name: audit_log_action; Type: INDEX; Schema: public; Owner: -
--

CREATE INDEX audit_log_action ON public.audit_log USING btree (action, id);


--
-- Name: update_tasks_agent; Type: INDEX; Schema: public; Owner: -
--

CREATE INDEX update_tasks_agent ON public.update_tasks USING btree (agent_id, created_at);


--
-- Name: update_tasks_one_active; Type: INDEX; Schema: public; Owner: -
--

CREATE UNIQUE INDEX update_tasks_one_active ON public.update_tasks USING btree (agent_id) WHERE (status = ANY (ARRAY['queued'::text, 'dispatched'::text, 'downloading'::text, 'verifying'::text, 'installing'::text, 'restarting'::text]));


--
-- Name: agents agents_site_id_fkey; Type: FK CONSTRAINT; Schema: public; Owner: -
--

ALTER TABLE ONLY public.agents
    ADD CONSTRAINT agents_site_id_fkey FOREIGN KEY (site_id) REFERENCES public.sites(id);


--
-- Name: enrollment_tokens enrollment_tokens_site_id_fkey; Type: FK CONSTRAINT; Schema: public; Owner: -
--

ALTER TABLE ONLY public.enrollment_tokens
    ADD CONSTRAINT enrollment_tokens_site_id_fkey FOREIGN KEY (site_id) REFERENCES public.sites(id);


--
-- Name: sites sites_client_id_fkey; Type: FK CONSTRAINT; Schema: public; Owner: -
--

ALTER TABLE ONLY public.sites
    ADD CONSTRAINT sites_client_id_fkey FOREIGN KEY (client_id) REFERENCES public.clients(id);


--
-- Name: update_tasks update_tasks_agent_id_fkey; Type: FK CONSTRAINT; Schema: public; Owner: -
--

ALTER TABLE ONLY public.update_tasks
    ADD CONSTRAINT update_tasks_agent_id_fkey FOREIGN KEY (agent_id) REFERENCES public.agents(id);


--
-- PostgreSQL database dump complete
--

\unrestrict pzZ0eLwfYR7bwsAmgXPTr3ss8vEelPYyig5t8WZAMFVpZxg5Fe1tNMlUwughTLj

