//! A deterministic corpus of guideline summaries: 18 conditions, each as an
//! English and a Chinese document with an untitled scope paragraph and six
//! sections (252 chunks in all), and paraphrased questions, each aimed at one
//! section of one document. The sections of every document share one
//! template, as real guideline summaries do, so a question must find both the
//! right condition and the right section among near-identical passages.
//! The clinical statements are short general summaries written for this test.

/// One condition: its name and the phrase of each section, per language.
/// Order: name, overview, diagnosis, treatment, lifestyle, monitoring, referral.
pub struct Topic {
    pub en: [&'static str; 7],
    pub zh: [&'static str; 7],
}

pub const SECTIONS_EN: [&str; 6] = [
    "Overview",
    "Diagnosis",
    "First-line treatment",
    "Lifestyle advice",
    "Monitoring and follow-up",
    "When to refer",
];
pub const SECTIONS_ZH: [&str; 6] = [
    "概述",
    "诊断",
    "一线治疗",
    "生活方式指导",
    "随访监测",
    "转诊指征",
];

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Language {
    English,
    Chinese,
}

impl Language {
    pub fn as_str(self) -> &'static str {
        match self {
            Language::English => "en",
            Language::Chinese => "zh",
        }
    }
}

/// The document title of topic `index` in `language`.
pub fn title(index: usize, language: Language) -> String {
    match language {
        Language::English => format!("{}: outpatient guideline summary", TOPICS[index].en[0]),
        Language::Chinese => format!("{}基层诊疗指南摘要", TOPICS[index].zh[0]),
    }
}

/// The Markdown document of topic `index` in `language`.
pub fn document(index: usize, language: Language) -> String {
    let topic = &TOPICS[index];
    match language {
        Language::English => {
            let [
                name,
                overview,
                diagnosis,
                treatment,
                lifestyle,
                monitoring,
                referral,
            ] = topic.en;
            let lower = name.to_lowercase();
            let bodies = [
                format!(
                    "Typical presentation: {overview}. Ask about duration, severity and previous episodes."
                ),
                format!("{diagnosis}. Record the result and its date in the medical record."),
                format!(
                    "{treatment}. Check allergies, kidney function and interacting medicines before prescribing."
                ),
                format!("{lifestyle}. Give written advice and agree on goals with the patient."),
                format!("{monitoring}."),
                format!("{referral}. Urgent cases go to the emergency department the same day."),
            ];
            let mut text = format!(
                "# {}\n\nThis summary covers the care of adults with {lower} in outpatient clinics. \
                 It is written for the hospital's doctors and nurses and follows the national \
                 guideline current at the time of writing.\n",
                title(index, language)
            );
            for (heading, body) in SECTIONS_EN.iter().zip(bodies) {
                text.push_str(&format!("\n## {heading}\n\n{body}\n"));
            }
            text
        }
        Language::Chinese => {
            let [
                name,
                overview,
                diagnosis,
                treatment,
                lifestyle,
                monitoring,
                referral,
            ] = topic.zh;
            let bodies = [
                format!("典型表现：{overview}。询问持续时间、严重程度及既往发作情况。"),
                format!("{diagnosis}。将结果及日期记录在病历中。"),
                format!("{treatment}。处方前核对过敏史、肾功能及相互作用药物。"),
                format!("{lifestyle}。提供书面建议并与患者商定目标。"),
                format!("{monitoring}。"),
                format!("{referral}。紧急情况当天转急诊。"),
            ];
            let mut text = format!(
                "# {}\n\n本摘要适用于门诊成人{name}患者的诊疗，供本院医生和护士参考，依据编写时现行的国家指南。\n",
                title(index, language)
            );
            for (heading, body) in SECTIONS_ZH.iter().zip(bodies) {
                text.push_str(&format!("\n## {heading}\n\n{body}\n"));
            }
            text
        }
    }
}

/// A question and the passage that answers it: topic index and section index (0..6).
pub struct Query {
    pub language: Language,
    pub topic: usize,
    pub section: usize,
    pub text: &'static str,
}

impl Query {
    /// `Title § Section` of the right passage.
    pub fn expected_citation(&self) -> String {
        let section = match self.language {
            Language::English => SECTIONS_EN[self.section],
            Language::Chinese => SECTIONS_ZH[self.section],
        };
        format!("{} § {section}", title(self.topic, self.language))
    }
}

const fn en(topic: usize, section: usize, text: &'static str) -> Query {
    Query {
        language: Language::English,
        topic,
        section,
        text,
    }
}

const fn zh(topic: usize, section: usize, text: &'static str) -> Query {
    Query {
        language: Language::Chinese,
        topic,
        section,
        text,
    }
}

// Section indexes.
const OVERVIEW: usize = 0;
const DIAGNOSIS: usize = 1;
const TREATMENT: usize = 2;
const LIFESTYLE: usize = 3;
const MONITORING: usize = 4;
const REFERRAL: usize = 5;

/// Paraphrased questions: one English and one Chinese per topic, aimed at
/// different sections.
pub const QUERIES: &[Query] = &[
    en(
        0,
        TREATMENT,
        "Which drug should I prescribe first for high blood pressure, and what if it is not enough after a month?",
    ),
    en(
        1,
        MONITORING,
        "How often should HbA1c be rechecked in a type 2 diabetic, and when are the eyes screened?",
    ),
    en(
        2,
        REFERRAL,
        "Asthma attack: when does the patient need to go to hospital?",
    ),
    en(3, DIAGNOSIS, "What spirometry ratio confirms COPD?"),
    en(
        4,
        LIFESTYLE,
        "What self-care should a heart failure patient do at home about daily weight and drinking?",
    ),
    en(
        5,
        TREATMENT,
        "Which anticoagulant for atrial fibrillation, and how is the stroke risk scored?",
    ),
    en(
        6,
        REFERRAL,
        "Which pneumonia patients should be admitted instead of treated at home?",
    ),
    en(
        7,
        DIAGNOSIS,
        "How is a bladder infection diagnosed in a young woman, and who needs a urine culture?",
    ),
    en(8, LIFESTYLE, "Diet advice to prevent gout flares"),
    en(
        9,
        TREATMENT,
        "How should a patient take weekly alendronate tablets?",
    ),
    en(
        10,
        MONITORING,
        "After changing the levothyroxine dose, when should thyroid function be tested again?",
    ),
    en(
        11,
        REFERRAL,
        "Unexplained low ferritin in a 60-year-old man: which investigations, and how soon?",
    ),
    en(
        12,
        TREATMENT,
        "What painkillers work for an acute migraine, and what prevents frequent attacks?",
    ),
    en(
        13,
        MONITORING,
        "How soon should someone starting an antidepressant be seen again?",
    ),
    en(
        14,
        REFERRAL,
        "When should a patient with chronic kidney disease be sent to a nephrologist?",
    ),
    en(
        15,
        LIFESTYLE,
        "Can a patient drive after a transient ischaemic attack?",
    ),
    en(
        16,
        DIAGNOSIS,
        "Which test detects Helicobacter pylori, and what must be stopped before it?",
    ),
    en(
        17,
        OVERVIEW,
        "What are the signs of a deep vein thrombosis in the leg?",
    ),
    zh(0, REFERRAL, "血压特别高还伴有胸痛，什么时候需要马上转诊？"),
    zh(
        1,
        DIAGNOSIS,
        "诊断2型糖尿病的血糖和糖化血红蛋白标准是多少？",
    ),
    zh(2, TREATMENT, "哮喘患者应该用什么吸入药物治疗？"),
    zh(
        3,
        LIFESTYLE,
        "慢阻肺病人除了用药还应该做什么，比如戒烟和打疫苗？",
    ),
    zh(4, MONITORING, "心衰患者调整药量后多久复查血钾和肾功能？"),
    zh(5, REFERRAL, "房颤病人心率很快或者晕倒了怎么办？"),
    zh(6, TREATMENT, "轻症社区获得性肺炎在家口服什么抗生素？"),
    zh(7, OVERVIEW, "尿频、尿急、尿痛是哪种感染的典型表现？"),
    zh(8, MONITORING, "吃别嘌醇期间多久查一次血尿酸？"),
    zh(9, DIAGNOSIS, "骨密度T值多少可以诊断骨质疏松？"),
    zh(10, TREATMENT, "甲减患者左甲状腺素的起始剂量怎么定？"),
    zh(11, LIFESTYLE, "缺铁性贫血饮食上应该多吃什么？"),
    zh(12, REFERRAL, "偏头痛患者出现哪些头痛需要紧急转诊？"),
    zh(13, DIAGNOSIS, "用什么量表筛查抑郁症，多少分算中度？"),
    zh(14, TREATMENT, "慢性肾脏病有蛋白尿时用什么药保护肾脏？"),
    zh(15, MONITORING, "短暂性脑缺血发作后血压和血脂应控制在多少？"),
    zh(16, TREATMENT, "幽门螺杆菌根除用什么方案，疗程几天？"),
    zh(17, REFERRAL, "下肢深静脉血栓的病人突然胸痛气短要怎么处理？"),
];

pub const TOPICS: [Topic; 18] = [
    Topic {
        en: [
            "Hypertension",
            "usually no symptoms; some patients report morning headache, dizziness or nosebleeds, and it is often found at a routine check",
            "Diagnose when clinic blood pressure is 140/90 mmHg or higher on two separate visits, confirmed by home or 24-hour ambulatory readings of 135/85 mmHg or higher",
            "Start a calcium channel blocker such as amlodipine or an ACE inhibitor such as enalapril; combine both if blood pressure stays above target after four weeks",
            "Cut salt to under 5 g a day, lose weight if overweight, limit alcohol and take 150 minutes of moderate exercise each week",
            "Review every month until the target below 130/80 mmHg is reached, then every three months; check potassium and creatinine yearly",
            "Refer at once if blood pressure is 180/120 mmHg or higher with chest pain, confusion, visual loss or signs of heart failure",
        ],
        zh: [
            "高血压",
            "多数无症状，部分患者有晨起头痛、头晕或鼻出血，常在体检时发现",
            "非同日两次诊室血压≥140/90 mmHg即可诊断，并以家庭血压或24小时动态血压≥135/85 mmHg确认",
            "首选钙通道阻滞剂如氨氯地平或血管紧张素转换酶抑制剂如依那普利；四周后血压仍未达标则两药联用",
            "每日食盐少于5克，超重者减重，限制饮酒，每周进行150分钟中等强度运动",
            "每月复诊直至血压降至130/80 mmHg以下，此后每三个月复诊一次；每年检查血钾和肌酐",
            "血压≥180/120 mmHg并伴胸痛、意识模糊、视力丧失或心衰表现时立即转诊",
        ],
    },
    Topic {
        en: [
            "Type 2 diabetes",
            "thirst, passing a lot of urine, tiredness, weight loss, blurred vision and slow-healing skin infections",
            "Diagnose with fasting plasma glucose of 7.0 mmol/L or more, a two-hour glucose of 11.1 mmol/L or more in an oral glucose tolerance test, or HbA1c of 6.5% or more",
            "Start metformin 500 mg once daily with the evening meal and increase slowly to 1 g twice daily; add an SGLT2 inhibitor for patients with heart or kidney disease",
            "Eat regular meals low in refined sugar, replace sweet drinks with water, and walk briskly for at least 30 minutes on most days",
            "Measure HbA1c every three months until stable and then every six months; examine the feet and screen the retina every year",
            "Refer the same day for ketones in the urine with vomiting, glucose above 25 mmol/L with drowsiness, or a foot ulcer with spreading infection",
        ],
        zh: [
            "2型糖尿病",
            "口渴、多尿、乏力、体重下降、视物模糊及皮肤感染迁延不愈",
            "空腹血糖≥7.0 mmol/L、口服葡萄糖耐量试验2小时血糖≥11.1 mmol/L或糖化血红蛋白≥6.5%即可诊断",
            "起始二甲双胍500 mg每日一次随晚餐服用，逐渐加量至1 g每日两次；合并心脏或肾脏疾病者加用SGLT2抑制剂",
            "规律进餐，少吃精制糖，用白开水代替含糖饮料，多数日子快走至少30分钟",
            "每三个月检测糖化血红蛋白直至稳定，之后每六个月一次；每年检查足部并筛查视网膜",
            "尿酮阳性伴呕吐、血糖高于25 mmol/L伴嗜睡或足部溃疡合并扩散性感染时当天转诊",
        ],
    },
    Topic {
        en: [
            "Asthma",
            "wheeze, cough at night, chest tightness and shortness of breath that vary over time and worsen with colds, exercise or allergens",
            "Confirm with spirometry showing an FEV1 rise of at least 12% and 200 mL after a bronchodilator, or a raised exhaled nitric oxide",
            "Give a low-dose inhaled corticosteroid with formoterol, used both daily and as needed for relief; never prescribe a reliever inhaler alone",
            "Stop smoking, avoid known triggers such as dust mites and pet hair, and keep up regular physical activity",
            "Check inhaler technique and symptom control at every visit and review the written action plan at least once a year",
            "Send to hospital if the patient cannot finish sentences, peak flow is under half of best, or oxygen saturation is below 92%",
        ],
        zh: [
            "哮喘",
            "喘息、夜间咳嗽、胸闷和气短，症状时轻时重，感冒、运动或接触过敏原后加重",
            "肺功能检查示吸入支气管舒张剂后FEV1增加≥12%且≥200 mL，或呼出气一氧化氮升高，即可确诊",
            "使用低剂量吸入糖皮质激素联合福莫特罗，每日维持并按需缓解使用；不可单独处方缓解用吸入剂",
            "戒烟，避免尘螨、宠物毛发等已知诱因，坚持规律体育活动",
            "每次随访检查吸入装置使用方法和症状控制情况，每年至少复核一次书面行动计划",
            "患者说话不能成句、峰流速低于个人最佳值一半或血氧饱和度低于92%时送医院",
        ],
    },
    Topic {
        en: [
            "COPD",
            "long-standing cough with sputum and breathlessness on exertion in a current or former smoker over 40 years old",
            "Confirm airflow obstruction with a post-bronchodilator FEV1/FVC ratio below 0.70 on spirometry",
            "Start a long-acting bronchodilator such as tiotropium, adding a second long-acting bronchodilator if breathlessness persists",
            "Stopping smoking is the single most effective step; offer pulmonary rehabilitation and yearly influenza vaccination",
            "Review breathlessness, exacerbations and inhaler use every six months, and measure oxygen saturation at each visit",
            "Refer for assessment of long-term oxygen when resting oxygen saturation is 92% or lower, and urgently for confusion or rising carbon dioxide",
        ],
        zh: [
            "慢性阻塞性肺疾病",
            "40岁以上吸烟或既往吸烟者长期咳嗽咳痰，活动后气促",
            "肺功能检查吸入支气管舒张剂后FEV1/FVC小于0.70可确认气流受限",
            "起始长效支气管舒张剂如噻托溴铵，气促持续时加用第二种长效支气管舒张剂",
            "戒烟是最有效的措施；提供肺康复训练并每年接种流感疫苗",
            "每六个月评估气促、急性加重次数和吸入剂使用情况，每次随访测量血氧饱和度",
            "静息血氧饱和度≤92%时转诊评估长期氧疗，出现意识障碍或二氧化碳升高时紧急转诊",
        ],
    },
    Topic {
        en: [
            "Heart failure",
            "breathlessness when lying flat, swollen ankles, waking at night short of breath and reduced exercise tolerance",
            "Measure NT-proBNP; a level above 400 pg/mL calls for an echocardiogram to measure the ejection fraction",
            "For reduced ejection fraction give an ACE inhibitor or sacubitril-valsartan, a beta-blocker such as bisoprolol, spironolactone and dapagliflozin; use furosemide for fluid overload",
            "Weigh every morning, limit fluids to about 1.5 litres a day when congested, and keep salt intake low",
            "Check weight, potassium and kidney function two weeks after each dose change; a gain of 2 kg in three days needs review",
            "Admit patients with breathlessness at rest, low blood pressure with cold hands and feet, or new heart failure after a heart attack",
        ],
        zh: [
            "心力衰竭",
            "平卧时气促、踝部水肿、夜间憋醒及活动耐量下降",
            "检测NT-proBNP；高于400 pg/mL时行超声心动图测定射血分数",
            "射血分数降低者使用ACEI或沙库巴曲缬沙坦、比索洛尔等β受体阻滞剂、螺内酯和达格列净；液体潴留时使用呋塞米",
            "每天早晨称体重，淤血时每日饮水限制在约1.5升，低盐饮食",
            "每次调整剂量后两周复查体重、血钾和肾功能；三天内体重增加2公斤需复诊",
            "静息时气促、低血压伴手足冰冷或心肌梗死后新发心衰的患者应收入院",
        ],
    },
    Topic {
        en: [
            "Atrial fibrillation",
            "palpitations, an irregularly irregular pulse, breathlessness, dizziness or no symptoms at all",
            "Confirm with a 12-lead ECG showing an irregular rhythm without P waves; use a Holter monitor for episodes that come and go",
            "Assess stroke risk with the CHA2DS2-VASc score and offer a direct oral anticoagulant such as apixaban when it is 2 or more in men or 3 or more in women; control the rate with a beta-blocker",
            "Limit alcohol, treat sleep apnoea, lose weight and avoid large amounts of caffeine",
            "Review bleeding risk, kidney function and the anticoagulant dose every year, and heart rate at each visit",
            "Refer urgently for a heart rate above 150 beats per minute, chest pain, fainting or signs of stroke",
        ],
        zh: [
            "心房颤动",
            "心悸、脉搏绝对不齐、气促、头晕，也可无症状",
            "12导联心电图显示节律绝对不齐且P波消失即可确诊；阵发性发作可行动态心电图监测",
            "用CHA2DS2-VASc评分评估卒中风险，男性≥2分或女性≥3分时给予阿哌沙班等直接口服抗凝药；用β受体阻滞剂控制心室率",
            "限制饮酒，治疗睡眠呼吸暂停，减轻体重，避免大量摄入咖啡因",
            "每年复查出血风险、肾功能和抗凝药剂量，每次随访测心率",
            "心率超过每分钟150次、胸痛、晕厥或出现卒中征象时紧急转诊",
        ],
    },
    Topic {
        en: [
            "Community-acquired pneumonia",
            "fever, cough with purulent sputum, pleuritic chest pain and crackles on auscultation",
            "Confirm with a chest X-ray showing new consolidation and grade severity with the CURB-65 score",
            "For a CURB-65 score of 0 or 1 treat at home with oral amoxicillin for five days, or doxycycline if allergic to penicillin",
            "Rest, drink plenty of fluids, take paracetamol for fever and do not smoke during recovery",
            "Review after 48 hours or sooner if worse; cough may last three weeks, and smokers over 50 need a repeat X-ray at six weeks",
            "Admit when the CURB-65 score is 2 or more, oxygen saturation is below 92%, or the patient cannot take oral medicine",
        ],
        zh: [
            "社区获得性肺炎",
            "发热、咳嗽咳脓痰、胸膜性胸痛，听诊可闻及湿啰音",
            "胸部X线显示新发实变影可确诊，并用CURB-65评分评估严重程度",
            "CURB-65评分0或1分者居家口服阿莫西林5天，青霉素过敏者改用多西环素",
            "注意休息、多饮水，发热时服用对乙酰氨基酚，康复期间不吸烟",
            "48小时后复诊，加重时提前；咳嗽可持续三周，50岁以上吸烟者六周后复查胸片",
            "CURB-65评分≥2分、血氧饱和度低于92%或无法口服药物者收入院",
        ],
    },
    Topic {
        en: [
            "Urinary tract infection",
            "burning on passing urine, urgency, frequency and lower abdominal pain without vaginal discharge",
            "In women under 65 with typical symptoms a urine dipstick positive for nitrite supports the diagnosis; send a urine culture in men, in pregnancy and in recurrent infection",
            "Give nitrofurantoin 100 mg modified release twice daily for three days in non-pregnant women; men need seven days",
            "Drink enough fluid to pass pale urine, do not hold urine for long, and consider cranberry products for recurrent infections",
            "Ask the patient to return if symptoms have not improved within 48 hours or come back within four weeks",
            "Refer the same day for fever with loin pain, vomiting or rigors, which suggest pyelonephritis",
        ],
        zh: [
            "尿路感染",
            "尿痛、尿急、尿频及下腹痛，无阴道分泌物异常",
            "65岁以下女性症状典型且尿试纸亚硝酸盐阳性可支持诊断；男性、妊娠及反复感染者应做尿培养",
            "非妊娠女性口服呋喃妥因缓释片100 mg每日两次共三天；男性疗程七天",
            "多饮水使尿色清淡，不要长时间憋尿，反复感染者可考虑蔓越莓制品",
            "嘱患者48小时内症状无改善或四周内复发时复诊",
            "发热伴腰痛、呕吐或寒战提示肾盂肾炎，应当天转诊",
        ],
    },
    Topic {
        en: [
            "Gout",
            "sudden severe pain, redness and swelling of one joint, most often the base of the big toe, starting overnight",
            "Diagnose clinically and confirm with urate crystals in joint fluid when possible; measure serum urate two weeks after the attack settles",
            "Treat a flare with colchicine 500 micrograms two to four times daily or an NSAID such as naproxen; start allopurinol after repeated attacks, aiming for urate below 360 micromol/L",
            "Reduce beer, spirits, sugary drinks, red meat and seafood, keep a healthy weight and drink plenty of water",
            "Check serum urate every month while titrating allopurinol and then once a year",
            "Refer a hot swollen joint with fever to exclude septic arthritis, and gout with kidney stones or kidney impairment",
        ],
        zh: [
            "痛风",
            "夜间突然出现单个关节剧烈疼痛、红肿，以第一跖趾关节最常见",
            "临床诊断，条件允许时关节液中找到尿酸盐结晶确诊；发作缓解两周后检测血尿酸",
            "急性发作用秋水仙碱500微克每日二至四次或萘普生等非甾体抗炎药；反复发作后开始别嘌醇，使血尿酸低于360微摩尔每升",
            "减少啤酒、烈酒、含糖饮料、红肉和海鲜摄入，保持健康体重并多饮水",
            "别嘌醇加量期间每月检测血尿酸，之后每年一次",
            "关节红肿热痛伴发热需转诊排除化脓性关节炎，合并肾结石或肾功能受损者也应转诊",
        ],
    },
    Topic {
        en: [
            "Osteoporosis",
            "no symptoms until a fracture of the wrist, hip or spine after a minor fall, with loss of height or a stooped back",
            "Measure bone mineral density by DXA; a T-score of -2.5 or lower at the hip or spine confirms osteoporosis",
            "Offer alendronic acid 70 mg once a week, taken with a full glass of water 30 minutes before breakfast while sitting upright, with calcium and vitamin D",
            "Do weight-bearing exercise, stop smoking, limit alcohol, and remove trip hazards at home to prevent falls",
            "Repeat the DXA scan after three to five years and review whether a drug holiday is appropriate",
            "Refer for specialist care after a new fracture on treatment, or when bisphosphonates cannot be taken",
        ],
        zh: [
            "骨质疏松症",
            "骨折前常无症状，轻微跌倒后发生腕部、髋部或脊柱骨折，可伴身高变矮或驼背",
            "用双能X线吸收法测量骨密度，髋部或腰椎T值≤-2.5即可确诊",
            "阿仑膦酸钠70 mg每周一次，早餐前30分钟用一满杯水送服并保持坐立位，同时补充钙剂和维生素D",
            "进行负重运动，戒烟限酒，清除家中绊倒隐患以预防跌倒",
            "三至五年后复查骨密度，并评估是否适合停药观察",
            "治疗期间发生新骨折或无法使用双膦酸盐者转专科诊治",
        ],
    },
    Topic {
        en: [
            "Hypothyroidism",
            "tiredness, feeling cold, weight gain, constipation, dry skin and low mood",
            "Diagnose with a raised TSH and a low free T4; repeat the test after six weeks when TSH is only mildly raised",
            "Start levothyroxine 1.6 micrograms per kilogram a day in younger adults, or 25 to 50 micrograms in older people and those with heart disease, taken on an empty stomach",
            "Take the tablet at the same time each day, at least four hours apart from calcium or iron supplements",
            "Check TSH six to eight weeks after each dose change and then once a year once it is stable",
            "Refer during pregnancy, in suspected pituitary disease, or if the patient becomes drowsy with a low temperature",
        ],
        zh: [
            "甲状腺功能减退症",
            "乏力、怕冷、体重增加、便秘、皮肤干燥和情绪低落",
            "促甲状腺激素升高且游离T4降低即可诊断；促甲状腺激素仅轻度升高时六周后复查",
            "年轻成人起始左甲状腺素每日每公斤1.6微克，老年人及心脏病患者起始25至50微克，空腹服用",
            "每天固定时间服药，与钙剂或铁剂间隔至少四小时",
            "每次调整剂量后六至八周复查促甲状腺激素，稳定后每年一次",
            "妊娠期、怀疑垂体疾病或患者出现嗜睡伴体温降低时转诊",
        ],
    },
    Topic {
        en: [
            "Iron deficiency anaemia",
            "tiredness, pale skin, breathlessness on exertion, hair loss and a craving for ice",
            "Confirm with low haemoglobin and a ferritin below 30 micrograms per litre, and look for the cause of blood loss",
            "Give ferrous sulfate 200 mg once daily or on alternate days, and continue for three months after haemoglobin returns to normal",
            "Eat iron-rich foods such as lean red meat, beans and dark green vegetables, with vitamin C and without tea at meals",
            "Check haemoglobin after two to four weeks, when it should have risen by about 20 g/L, then every three months for a year",
            "Refer men and postmenopausal women with unexplained iron deficiency for gastroscopy and colonoscopy within two weeks",
        ],
        zh: [
            "缺铁性贫血",
            "乏力、皮肤苍白、活动后气促、脱发及嗜食冰块",
            "血红蛋白降低且铁蛋白低于30微克每升即可确诊，并查找失血原因",
            "硫酸亚铁200 mg每日一次或隔日一次，血红蛋白恢复正常后继续服用三个月",
            "多吃瘦红肉、豆类和深绿色蔬菜等富含铁的食物，餐时搭配维生素C，避免饮茶",
            "二至四周后复查血红蛋白，应上升约20 g/L，此后一年内每三个月复查",
            "原因不明的缺铁男性及绝经后女性应在两周内转诊行胃镜和结肠镜检查",
        ],
    },
    Topic {
        en: [
            "Migraine",
            "recurrent one-sided throbbing headache lasting hours, with nausea and sensitivity to light and sound, sometimes after a visual aura",
            "Diagnose from a history of at least five typical attacks and a normal neurological examination; a headache diary helps",
            "Treat an attack early with aspirin 900 mg or ibuprofen 400 mg, adding a triptan such as sumatriptan if that fails; offer propranolol for prevention when attacks are frequent",
            "Keep regular sleep and meals, stay hydrated, and identify triggers such as lack of sleep, alcohol and stress",
            "Review the headache diary after three months of prevention and watch for medication-overuse headache",
            "Refer urgently for a sudden thunderclap headache, headache with fever and neck stiffness, or new neurological weakness",
        ],
        zh: [
            "偏头痛",
            "反复发作的单侧搏动性头痛，持续数小时，伴恶心、畏光畏声，部分有视觉先兆",
            "根据至少五次典型发作病史及神经系统检查正常作出诊断，头痛日记有助于诊断",
            "发作早期服用阿司匹林900 mg或布洛芬400 mg，无效时加用舒马普坦等曲坦类药物；发作频繁者用普萘洛尔预防",
            "保持规律睡眠和进餐，充足饮水，识别睡眠不足、饮酒和压力等诱因",
            "预防治疗三个月后复核头痛日记，警惕药物过度使用性头痛",
            "突发霹雳样头痛、头痛伴发热和颈项强直或新发神经功能缺损时紧急转诊",
        ],
    },
    Topic {
        en: [
            "Depression",
            "low mood, loss of interest or pleasure, poor sleep, low energy and poor concentration for at least two weeks",
            "Use the PHQ-9 questionnaire, where a score of 10 or more suggests moderate depression, and always ask directly about suicidal thoughts",
            "Offer a psychological therapy such as cognitive behavioural therapy, or an SSRI such as sertraline 50 mg daily, continued for at least six months after recovery",
            "Encourage regular physical activity, a daily routine, good sleep habits and contact with family and friends",
            "See the patient again within two weeks of starting an antidepressant, or within one week if under 25 years old",
            "Refer the same day for active suicidal plans, psychotic symptoms or severe self-neglect",
        ],
        zh: [
            "抑郁症",
            "情绪低落、兴趣或愉快感丧失、睡眠差、精力不足及注意力下降，持续至少两周",
            "使用PHQ-9问卷，评分≥10分提示中度抑郁，并务必直接询问有无自杀念头",
            "提供认知行为治疗等心理治疗，或舍曲林50 mg每日一次等选择性5-羟色胺再摄取抑制剂，康复后继续服用至少六个月",
            "鼓励规律体育活动、保持日常作息、良好睡眠习惯并多与亲友交流",
            "开始服用抗抑郁药后两周内复诊，25岁以下患者一周内复诊",
            "有明确自杀计划、精神病性症状或严重自我忽视时当天转诊",
        ],
    },
    Topic {
        en: [
            "Chronic kidney disease",
            "usually silent until late; later tiredness, itching, swollen legs and passing less urine",
            "Diagnose when eGFR is below 60 mL/min/1.73 m² or the urine albumin-to-creatinine ratio is 3 mg/mmol or more for more than three months",
            "Give an ACE inhibitor or angiotensin receptor blocker when albuminuria is present, add an SGLT2 inhibitor such as dapagliflozin, and avoid NSAIDs",
            "Limit salt, avoid high-dose protein supplements, stop smoking and check every new medicine with a pharmacist",
            "Measure eGFR and the albumin-to-creatinine ratio one to three times a year depending on the stage",
            "Refer to a nephrologist when eGFR falls below 30, drops by 25% within a year, or the albumin-to-creatinine ratio is above 70 mg/mmol",
        ],
        zh: [
            "慢性肾脏病",
            "早期多无症状，晚期出现乏力、皮肤瘙痒、下肢水肿及尿量减少",
            "估算肾小球滤过率低于60 mL/min/1.73 m²或尿白蛋白肌酐比≥3 mg/mmol持续超过三个月即可诊断",
            "有白蛋白尿时使用ACEI或血管紧张素受体拮抗剂，加用达格列净等SGLT2抑制剂，避免使用非甾体抗炎药",
            "限制食盐，避免大剂量蛋白补充剂，戒烟，每种新药都应咨询药师",
            "根据分期每年检测一至三次估算肾小球滤过率和尿白蛋白肌酐比",
            "估算肾小球滤过率低于30、一年内下降25%或尿白蛋白肌酐比高于70 mg/mmol时转肾内科",
        ],
    },
    Topic {
        en: [
            "Transient ischaemic attack",
            "sudden weakness or numbness of the face, arm or leg, slurred speech or loss of vision that resolves completely within 24 hours",
            "Diagnose from the history, record an ECG to look for atrial fibrillation, and arrange brain imaging and carotid ultrasound",
            "Give aspirin 300 mg at once unless the patient is bleeding, then a statin and clopidogrel long term as advised by the stroke team",
            "Do not drive for one month, stop smoking, reduce salt and alcohol and stay active",
            "Keep blood pressure below 130/80 mmHg and LDL cholesterol below 1.8 mmol/L, reviewed at every visit",
            "Everyone with a suspected TIA should be seen by a stroke specialist within 24 hours; call an ambulance if symptoms are still present",
        ],
        zh: [
            "短暂性脑缺血发作",
            "突发面部、上肢或下肢无力或麻木，言语含糊或视力丧失，24小时内完全恢复",
            "根据病史诊断，行心电图查找心房颤动，并安排头颅影像学检查和颈动脉超声",
            "无出血时立即给予阿司匹林300 mg，之后按卒中团队建议长期使用他汀类药物和氯吡格雷",
            "一个月内不驾驶，戒烟，减少食盐和饮酒，保持活动",
            "将血压控制在130/80 mmHg以下、低密度脂蛋白胆固醇低于1.8 mmol/L，每次随访复核",
            "所有疑似短暂性脑缺血发作者应在24小时内由卒中专科医生诊治；症状仍存在时呼叫救护车",
        ],
    },
    Topic {
        en: [
            "Helicobacter pylori infection",
            "upper abdominal pain or burning, bloating and indigestion; the infection can cause peptic ulcers and stomach cancer",
            "Test with a carbon-13 urea breath test or a stool antigen test, stopping proton pump inhibitors for two weeks beforehand",
            "Give bismuth quadruple therapy for 14 days: a proton pump inhibitor, bismuth and two antibiotics such as amoxicillin and clarithromycin",
            "Use serving chopsticks at shared meals, wash hands before eating, and avoid smoking and alcohol during treatment",
            "Confirm eradication with a repeat breath test at least four weeks after finishing the antibiotics",
            "Refer for urgent gastroscopy with weight loss, difficulty swallowing, vomiting blood, black stools, or new symptoms after the age of 55",
        ],
        zh: [
            "幽门螺杆菌感染",
            "上腹痛或烧灼感、腹胀及消化不良，可导致消化性溃疡和胃癌",
            "采用碳13尿素呼气试验或粪便抗原检测，检测前停用质子泵抑制剂两周",
            "铋剂四联疗法14天：质子泵抑制剂、铋剂加阿莫西林和克拉霉素两种抗生素",
            "聚餐使用公筷，餐前洗手，治疗期间避免吸烟饮酒",
            "抗生素疗程结束至少四周后复查呼气试验确认根除",
            "出现体重下降、吞咽困难、呕血、黑便或55岁以上新发症状时转诊紧急胃镜",
        ],
    },
    Topic {
        en: [
            "Deep vein thrombosis",
            "one swollen, painful, warm calf or thigh, often after surgery, a long journey or immobility",
            "Use the two-level Wells score; if DVT is likely arrange a proximal leg vein ultrasound within four hours, and if unlikely test D-dimer first",
            "Start a direct oral anticoagulant such as rivaroxaban or apixaban and continue it for at least three months",
            "Walk as normal, raise the leg when resting, avoid long periods of sitting and drink enough fluids on journeys",
            "Review at three months to decide whether to stop anticoagulation, and check for bleeding and post-thrombotic symptoms",
            "Send to the emergency department for sudden breathlessness, chest pain or coughing blood, which suggest pulmonary embolism",
        ],
        zh: [
            "深静脉血栓",
            "单侧小腿或大腿肿胀、疼痛、皮温升高，常见于手术、长途旅行或制动后",
            "使用二级Wells评分；可能性大时四小时内行下肢近端静脉超声，可能性小时先查D-二聚体",
            "起始利伐沙班或阿哌沙班等直接口服抗凝药，至少持续三个月",
            "正常行走，休息时抬高患肢，避免久坐，旅途中充足饮水",
            "三个月时复诊决定是否停用抗凝药，并检查有无出血及血栓后综合征症状",
            "突发气促、胸痛或咯血提示肺栓塞，应送急诊",
        ],
    },
];
